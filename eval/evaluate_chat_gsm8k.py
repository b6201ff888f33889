"""GSM8K, chat models: zero-shot through chat (the bare question), greedy, batched.

    python eval/evaluate_chat_gsm8k.py -f data/gsm8k/test.jsonl -c Qwen/Qwen-7B-Chat
    python eval/evaluate_chat_gsm8k.py -f data/gsm8k/test.jsonl --fewshot-file shots.txt   # few-shot

Answers are extracted as in evaluate_gsm8k.py, and the original's extraction is scored too.
"""

import _common  # noqa: F401
import evaluate_gsm8k


def main(argv=None) -> dict:
    evaluate_gsm8k.__doc__ = __doc__
    return evaluate_gsm8k.main(argv, chat=True)


if __name__ == "__main__":
    main()
