"""C-Eval, base models: 5-shot on the validation split, answer letters scored by log-probability.

    python eval/evaluate_ceval.py -d data/ceval/ -c Qwen/Qwen-7B

Resumable: a rerun with the same settings skips what is in the output directory
(`ceval_samples.jsonl`, one record per question; summary in `ceval_summary.json`).
See eval/EVALUATION.md.
"""

import argparse

import _common

from qwen.evaluation import load_multiple_choice
from qwen.evaluation.results import ResultStore
from qwen.evaluation.tasks import add_common_arguments, limit_data, make_backend, run_multiple_choice, settings_of


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
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev (default 5, as published)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="longer prompts keep their last tokens, as the original (default 2048)",
    )
    parser.add_argument("--split", default="val", help="evaluated split (default val; test has no answers)")
    add_common_arguments(parser, "Qwen/Qwen-7B")
    args = parser.parse_args(argv)
    data = limit_data(
        load_multiple_choice("ceval", args.eval_data_path, split=args.split, subjects=args.subjects), args.limit
    )
    store = ResultStore(args.output_dir, "ceval", settings_of(args), overwrite=args.overwrite)
    backend = make_backend(args, chat=False)
    summary = run_multiple_choice(
        backend, "ceval", data, store, shots=args.shots, max_seq_len=args.max_seq_len, progress=not args.no_progress
    )
    _common.report(summary, ("overall", "micro_average", "macro_average", "categories", "hard", "n"))
    return summary


if __name__ == "__main__":
    main()
