"""MMLU, chat models: zero-shot through chat, the chosen letter extracted from the response.

    python eval/evaluate_chat_mmlu.py -d data/mmlu/data/ -c Qwen/Qwen-7B-Chat

Resumable: a rerun with the same settings skips what is in the output directory
(`chat_mmlu_samples.jsonl`, one record per question; summary in `chat_mmlu_summary.json`).
See eval/EVALUATION.md.
"""

import _common


def main(argv=None) -> dict:
    return _common.multiple_choice_main(
        "mmlu", __doc__, "the unpacked data.tar: the folder with test/", argv, chat=True
    )


if __name__ == "__main__":
    main()
