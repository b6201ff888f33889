"""C-Eval, chat models: zero-shot on the validation split through chat, the chosen letter extracted.

    python eval/evaluate_chat_ceval.py -d data/ceval/ -c Qwen/Qwen-7B-Chat

Resumable: a rerun with the same settings skips what is in the output directory
(`chat_ceval_samples.jsonl`, one record per question; summary in `chat_ceval_summary.json`).
See eval/EVALUATION.md.
"""

import _common


def main(argv=None) -> dict:
    return _common.multiple_choice_main(
        "ceval", __doc__, "the unpacked ceval-exam.zip: the folder with dev/ and val/", argv, split="val", chat=True
    )


if __name__ == "__main__":
    main()
