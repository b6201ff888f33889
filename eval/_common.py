"""Shared start-up of the eval/ scripts: make the repository's `qwen` importable, set up logging."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

try:
    import qwen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import qwen  # noqa: F401

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def report(summary: dict, keys: tuple[str, ...]) -> None:
    """Print the headline numbers and where the files are."""
    shown = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(shown, indent=2, ensure_ascii=False))


def multiple_choice_main(
    task: str, doc: str, data_help: str, argv=None, split: str | None = None, chat: bool = False
) -> dict:
    """The multiple-choice scripts (MMLU, C-Eval, CMMLU). Base models (``chat=False``):
    5-shot, answer letters scored by log-probability. Chat models: zero-shot through chat,
    the chosen letter extracted from the response. ``split`` (C-Eval) adds a ``--split``
    option with that default."""
    import argparse

    from qwen.evaluation import load_multiple_choice
    from qwen.evaluation.results import ResultStore
    from qwen.evaluation.tasks import (
        add_common_arguments,
        limit_data,
        make_backend,
        run_chat_choice,
        run_multiple_choice,
        settings_of,
    )

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--eval-data-path", "--eval_data_path", required=True, help=data_help)
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: every file found)")
    if chat:
        parser.add_argument("--max-new-tokens", type=int, help="response length limit (default: the checkpoint's)")
    else:
        parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev (default 5, as published)")
        parser.add_argument(
            "--max-seq-len",
            type=int,
            default=2048,
            help="longer prompts keep their last tokens, as the original (default 2048)",
        )
    if split is not None:
        parser.add_argument("--split", default=split, help=f"evaluated split (default {split}; test has no answers)")
    add_common_arguments(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B")
    args = parser.parse_args(argv)
    splits = {} if split is None else {"split": args.split}
    data = limit_data(load_multiple_choice(task, args.eval_data_path, subjects=args.subjects, **splits), args.limit)
    store = ResultStore(args.output_dir, f"chat_{task}" if chat else task, settings_of(args), overwrite=args.overwrite)
    backend = make_backend(args, chat=chat)
    progress = not args.no_progress
    if chat:
        summary = run_chat_choice(backend, task, data, store, max_new_tokens=args.max_new_tokens, progress=progress)
    else:
        summary = run_multiple_choice(
            backend, task, data, store, shots=args.shots, max_seq_len=args.max_seq_len, progress=progress
        )
    report(summary, ("overall", "micro_average", "macro_average", "categories", "hard", "n"))
    return summary
