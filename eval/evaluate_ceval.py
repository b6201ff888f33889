"""C-Eval, base models: 5-shot on the validation split, answer letters scored by log-probability.

    python eval/evaluate_ceval.py -d data/ceval/ -c Qwen/Qwen-7B

Resumable: a rerun with the same settings skips what is in the output directory
(`ceval_samples.jsonl`, one record per question; summary in `ceval_summary.json`).
See eval/EVALUATION.md.
"""

import _common


def main(argv=None) -> dict:
    return _common.multiple_choice_main(
        "ceval", __doc__, "the unpacked ceval-exam.zip: the folder with dev/ and val/", argv, split="val"
    )


if __name__ == "__main__":
    main()
