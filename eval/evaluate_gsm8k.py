"""GSM8K, base models: 8-shot step-by-step completion, greedy, batched.

    python eval/evaluate_gsm8k.py -f data/gsm8k/test.jsonl --fewshot-file gsm8k_prompt.txt -c Qwen/Qwen-7B

The published numbers used the original's 8-shot prompt, `gsm8k_prompt.txt` (see
eval/EVALUATION.md for where to get it); `--fewshot-from train.jsonl` builds one in the
same format from the first 8 training problems instead. Each generation is cut at a blank
line or "Question:", as the original did. The answer is the final number ("The answer is
N", else the last number, commas, signs and decimals understood); the original's extraction
(the last run of digits) is also scored, and the summary gives both.
"""

import argparse

import _common

from qwen.evaluation.data import gsm8k_fewshot_from_train, read_jsonl
from qwen.evaluation.results import ResultStore
from qwen.evaluation.tasks import add_common_arguments, make_backend, run_gsm8k, settings_of


def fewshot_text(args) -> str | None:
    if args.fewshot_file:
        with open(args.fewshot_file, encoding="utf-8") as f:
            return f.read()
    if args.fewshot_from:
        return gsm8k_fewshot_from_train(read_jsonl(args.fewshot_from))
    return None


def main(argv=None, chat: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-f", "--sample-input-file", required=True, help="GSM8K test split as JSON lines (question, answer)"
    )
    shots = parser.add_mutually_exclusive_group(required=not chat)
    shots.add_argument("--fewshot-file", help="the few-shot text (the original's gsm8k_prompt.txt)")
    shots.add_argument("--fewshot-from", metavar="TRAIN_JSONL", help="build an 8-shot prompt from GSM8K train")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation limit (default 512)")
    add_common_arguments(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B")
    args = parser.parse_args(argv)
    docs = read_jsonl(args.sample_input_file)[: args.limit]
    fewshot = fewshot_text(args)
    task = "chat_gsm8k" if chat else "gsm8k"
    store = ResultStore(args.output_dir, task, settings_of(args, fewshot=fewshot), overwrite=args.overwrite)
    backend = make_backend(args, chat=chat)
    summary = run_gsm8k(
        backend,
        docs,
        store,
        chat=chat,
        fewshot=fewshot,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    _common.report(summary, ("accuracy", "accuracy_original_extraction", "verdicts_differing_from_original", "n"))
    return summary


if __name__ == "__main__":
    main()
