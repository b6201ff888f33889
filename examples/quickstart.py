"""The README quickstart: multi-turn chat, a system prompt, streaming and batch chat.

    python -m qwen tiny /tmp/qwen-tiny-chat --chat     # a tiny random stand-in, offline
    python examples/quickstart.py /tmp/qwen-tiny-chat  # or Qwen/Qwen-7B-Chat, a local path, ...

A random tiny model answers gibberish; a real checkpoint answers for real.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Qwen-1 classes with the Auto factories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Qwen-1 -Chat checkpoint: hub name or local directory")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, device_map="auto" if torch.cuda.is_available() else "cpu"
    ).eval()
    gen = {"max_new_tokens": args.max_new_tokens}

    response, history = model.chat(tokenizer, "你好", history=None, **gen)
    print("turn 1:", response)
    response, history = model.chat(tokenizer, "Tell me a story about a young founder.", history=history, **gen)
    print("turn 2:", response)

    response, _ = model.chat(tokenizer, "What's the weather like?", system="You are a terse old sea captain.", **gen)
    print("system prompt:", response)

    print("streaming: ", end="")
    shown = ""
    for partial in model.chat_stream(tokenizer, "Write a poem about autumn.", history=history, **gen):
        print(partial[len(shown) :], end="", flush=True)  # each item is the whole answer so far
        shown = partial
    print()

    responses, _ = model.chat_batch(tokenizer, ["Say I love you.", "Recommend something sweet."], **gen)
    for i, r in enumerate(responses):
        print(f"batch {i}:", r)


if __name__ == "__main__":
    main()
