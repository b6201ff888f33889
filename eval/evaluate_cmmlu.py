"""CMMLU, base models: 5-shot, answer letters scored by log-probability.

    python eval/evaluate_cmmlu.py -d data/cmmlu/ -c Qwen/Qwen-7B

Resumable: a rerun with the same settings skips what is in the output directory
(`cmmlu_samples.jsonl`, one record per question; summary in `cmmlu_summary.json`).
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
        help="the unpacked cmmlu_v1_0_1.zip: the folder with dev/ and test/",
    )
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: every file found)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev (default 5, as published)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="longer prompts keep their last tokens, as the original (default 2048)",
    )
    add_common_arguments(parser, "Qwen/Qwen-7B")
    args = parser.parse_args(argv)
    data = limit_data(load_multiple_choice("cmmlu", args.eval_data_path, subjects=args.subjects), args.limit)
    store = ResultStore(args.output_dir, "cmmlu", settings_of(args), overwrite=args.overwrite)
    backend = make_backend(args, chat=False)
    summary = run_multiple_choice(
        backend, "cmmlu", data, store, shots=args.shots, max_seq_len=args.max_seq_len, progress=not args.no_progress
    )
    _common.report(summary, ("overall", "micro_average", "macro_average", "categories", "hard", "n"))
    return summary


if __name__ == "__main__":
    main()
