"""Batch inference with a Qwen(-1) chat model: the official README's example, on this package.

Left-pads several ChatML prompts built by ``make_context``, generates them in one
``generate()`` call, cuts each response out with ``decode_tokens``, then answers the same
queries one at a time with ``model.chat()`` for comparison. ``model.chat_batch()`` does
the same in one call.

Runs offline against a tiny random checkpoint (its answers are gibberish)::

    python -m qwen tiny /tmp/qwen-tiny-chat --chat
    python examples/batch_inference.py /tmp/qwen-tiny-chat --max-new-tokens 16 --greedy

or against a real one, e.g. a local copy of Qwen/Qwen-7B-Chat.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import qwen  # noqa: F401  (registers the Qwen-1 classes with the Auto* factories)
from qwen.qwen_generation_utils import decode_tokens, get_stop_words_ids, make_context

DEFAULT_QUERIES = ["我想听你说爱我。", "今天我想吃点啥，甜甜的，推荐下", "我马上迟到了，怎么做才能不迟到"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help="a Qwen(-1) chat checkpoint directory (e.g. from `python -m qwen tiny DIR --chat`)"
    )
    parser.add_argument("--query", action="append", help="a query (repeat for several; default: the README's three)")
    parser.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation config")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding, so the batch and the one-by-one answers must agree (for plain queries: the "
        "README's batch recipe tokenizes the whole prompt text, so a query with special-token text or a "
        "leading newline is encoded differently from chat())",
    )
    parser.add_argument("--device-map", default="auto", help='where to load the model ("auto", "cpu", "cuda:0", ...)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    queries = args.query or DEFAULT_QUERIES

    # To generate attention masks automatically, pad_token and eos_token must be
    # different tokens, and the generation config needs the pad_token_id.
    tokenizer = AutoTokenizer.from_pretrained(
        args.checkpoint,
        pad_token="<|extra_0|>",
        eos_token="<|endoftext|>",
        padding_side="left",
    )
    # The README also passes pad_token_id=... here; on transformers 5 the pad id belongs
    # in the generation config only (set on the next line).
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map=args.device_map).eval()
    model.generation_config = GenerationConfig.from_pretrained(args.checkpoint, pad_token_id=tokenizer.pad_token_id)
    if args.max_new_tokens is not None:
        model.generation_config.max_new_tokens = args.max_new_tokens
    if args.greedy:
        model.generation_config.do_sample = False

    batch_raw_text = []
    for query in queries:
        raw_text, _ = make_context(
            tokenizer,
            query,
            system=args.system,
            max_window_size=model.generation_config.max_window_size,
            chat_format=model.generation_config.chat_format,
        )
        batch_raw_text.append(raw_text)

    batch_input_ids = tokenizer(batch_raw_text, padding="longest")
    batch_input_ids = torch.LongTensor(batch_input_ids["input_ids"]).to(model.device)
    batch_out_ids = model.generate(
        batch_input_ids,
        # Stop each row at <|im_end|>: the README leaves this out and lets rows run on to
        # <|endoftext|>; decode_tokens cuts the response at <|im_end|> either way.
        stop_words_ids=get_stop_words_ids(model.generation_config.chat_format, tokenizer),
        generation_config=model.generation_config,
    )
    padding_lens = [batch_input_ids[i].eq(tokenizer.pad_token_id).sum().item() for i in range(batch_input_ids.size(0))]

    batch_response = [
        decode_tokens(
            batch_out_ids[i][padding_lens[i] :],
            tokenizer,
            raw_text_len=len(batch_raw_text[i]),
            context_length=(batch_input_ids[i].size(0) - padding_lens[i]),
            chat_format="chatml",
            verbose=False,
            errors="replace",
        )
        for i in range(len(queries))
    ]
    print("batch:", batch_response)

    single_response = []
    for query in queries:
        response, _ = model.chat(tokenizer, query, history=None, system=args.system)
        single_response.append(response)
    print("one by one:", single_response)

    responses, _ = model.chat_batch(tokenizer, queries, system=args.system)
    print("chat_batch:", responses)

    if args.greedy:
        same = batch_response == single_response == responses
        print("greedy batch == one by one:", same)
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
