"""C-Eval, chat models: zero-shot on the validation split through chat, the chosen letter extracted.

    python eval/evaluate_chat_ceval.py -d data/ceval/ -c Qwen/Qwen-7B-Chat

Resumable: a rerun with the same settings skips what is in the output directory
(`chat_ceval_samples.jsonl`, one record per question; summary in `chat_ceval_summary.json`).
See eval/EVALUATION.md.
"""

import argparse

import _common

from qwen.evaluation import load_multiple_choice
from qwen.evaluation.results import ResultStore
from qwen.evaluation.tasks import add_common_arguments, limit_data, make_backend, run_chat_choice, settings_of


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-d",
        "--eval-data-path",
        "--eval_data_path",
        required=True,
        help="the unpacked ceval-exam.zip: the folder with dev/ and val/",
    )
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: every file found)")
    parser.add_argument("--max-new-tokens", type=int, help="response length limit (default: the checkpoint's)")
    parser.add_argument("--split", default="val", help="evaluated split (default val)")
    add_common_arguments(parser, "Qwen/Qwen-7B-Chat")
    args = parser.parse_args(argv)
    data = limit_data(
        load_multiple_choice("ceval", args.eval_data_path, split=args.split, subjects=args.subjects), args.limit
    )
    store = ResultStore(args.output_dir, "chat_ceval", settings_of(args), overwrite=args.overwrite)
    backend = make_backend(args, chat=True)
    summary = run_chat_choice(
        backend, "ceval", data, store, max_new_tokens=args.max_new_tokens, progress=not args.no_progress
    )
    _common.report(summary, ("overall", "micro_average", "macro_average", "categories", "hard", "n"))
    return summary


if __name__ == "__main__":
    main()
