"""MMLU, base models: 5-shot, answer letters scored by log-probability.

    python eval/evaluate_mmlu.py -d data/mmlu/data/ -c Qwen/Qwen-7B

Resumable: a rerun with the same settings skips what is in the output directory
(`mmlu_samples.jsonl`, one record per question; summary in `mmlu_summary.json`).
See eval/EVALUATION.md.
"""

import _common


def main(argv=None) -> dict:
    return _common.multiple_choice_main("mmlu", __doc__, "the unpacked data.tar: the folder with dev/ and test/", argv)


if __name__ == "__main__":
    main()
