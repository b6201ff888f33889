"""Tool use (ReAct), chat models: the original's tool-use benchmark.

    python eval/evaluate_plugin.py -c Qwen/Qwen-7B-Chat \\
        --positive data/exam_plugin_v20231206_react_positive.jsonl \\
        --negative data/exam_plugin_v20231206_react_negative.jsonl

Each line holds a ReAct `prompt` (tools described inside) and the reference `response`.
Reported: tool selection accuracy (the response calls the reference's tool), tool input
ROUGE-L (the Action Input JSON, canonicalized, compared in tokenizer tokens) and the
false-positive rate (a tool called where none should be). The original's Hugging Face
Agent evaluation is not included: transformers 5 removed transformers.tools.
"""

import argparse

import _common

from qwen.evaluation.data import read_jsonl
from qwen.evaluation.results import ResultStore
from qwen.evaluation.tasks import add_common_arguments, make_backend, run_plugin, settings_of


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positive", help="exam_plugin_*_react_positive.jsonl")
    parser.add_argument("--negative", help="exam_plugin_*_react_negative.jsonl")
    parser.add_argument("--tokenizer", help="tokenizer for ROUGE-L with --api-base (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, help="response length limit (default: the checkpoint's)")
    add_common_arguments(parser, "Qwen/Qwen-7B-Chat")
    args = parser.parse_args(argv)
    if not args.positive and not args.negative:
        parser.error("give --positive and/or --negative")
    positive = read_jsonl(args.positive)[: args.limit] if args.positive else None
    negative = read_jsonl(args.negative)[: args.limit] if args.negative else None
    store = ResultStore(args.output_dir, "plugin", settings_of(args), overwrite=args.overwrite)
    backend = make_backend(args, chat=True)
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint_path)
    summary = run_plugin(
        backend, tokenizer, store, positive, negative, max_new_tokens=args.max_new_tokens, progress=not args.no_progress
    )
    _common.report(summary, ("react_positive", "react_negative"))
    return summary


if __name__ == "__main__":
    main()
