"""CMMLU, base models: 5-shot, answer letters scored by log-probability.

    python eval/evaluate_cmmlu.py -d data/cmmlu/ -c Qwen/Qwen-7B

Resumable: a rerun with the same settings skips what is in the output directory
(`cmmlu_samples.jsonl`, one record per question; summary in `cmmlu_summary.json`).
See eval/EVALUATION.md.
"""

import _common


def main(argv=None) -> dict:
    return _common.multiple_choice_main(
        "cmmlu", __doc__, "the unpacked cmmlu_v1_0_1.zip: the folder with dev/ and test/", argv
    )


if __name__ == "__main__":
    main()
