"""Tool use with ReAct prompting and ``model.chat``: a whole loop with real local tools.

The model gets the ReAct instruction (the tools, then the Question / Thought / Action /
Action Input / Observation / Final Answer format; see react_prompt.md) and stops at
"Observation:". When it asked for a tool, the tool runs here (a safe calculator or a
search over local notes, from local_tools.py), its result is appended as the
Observation, and the model is asked again, until it writes a Final Answer. Several
``--question``s make a multi-turn chat: earlier questions and answers are the history.

    python examples/react_demo.py --model Qwen/Qwen-7B-Chat \\
        --question "What is 37 * (12 + 5)?" --question "And what does convert-qwen2 do?"

A tiny random checkpoint (``python -m qwen tiny DIR --chat``) runs the same code but
writes gibberish instead of actions. ``--scripted-replies FILE`` (a testing aid: a JSON
list of strings) makes the model write the given replies in order, one per model call,
through a logits processor, so that the tool path runs on such a checkpoint too; the
model, the prompts, the stop words and the tools are the real ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import qwen  # noqa: F401  (registers the Qwen-1 classes with the Auto* factories)
from qwen.serving.function_call import function_names, parse_react, react_instruction, select_functions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_tools import QWEN_PLUGINS, run_tool  # noqa: E402

# Generation stops once the model writes one of these: the observation is ours to give.
# "Observation:" and "Observation:\n" are different token sequences (":\n" is one token).
STOP_WORDS = ["Observation:", "Observation:\n"]


class ForcedText(LogitsProcessor):
    """Testing aid: makes one generation produce ``token_ids`` (then ``end_id``),
    whatever the model's own scores, by leaving only that token allowed at each step."""

    def __init__(self, token_ids: list[int], end_id: int):
        self.token_ids = list(token_ids) + [end_id]
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.token_ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0.0
        return forced


def react(
    model,
    tokenizer,
    question: str,
    history: list[tuple[str, str]],
    plugins: list[dict],
    max_steps: int = 5,
    scripted: Iterator[str] | None = None,
    **generate_kwargs,
) -> tuple[str, str]:
    """Answer ``question`` with the tools ``plugins`` (Qwen-style definitions); returns the
    final answer and the whole Thought/Action/Observation trace."""
    plugins, _ = select_functions(functions=plugins)  # checked, each with its "name"
    instruction = react_instruction(plugins)
    names = function_names(plugins)
    stop_words_ids = [tokenizer.encode(word) for word in STOP_WORDS]
    trace = ""
    for step in range(1, max_steps + 1):
        # The question and the trace so far go into one user message; the model writes the
        # next Thought (then an Action, or the Final Answer).
        query = f"{instruction}\n\nQuestion: {question}" + (f"\n{trace}" if trace else "")
        kwargs = dict(generate_kwargs)
        if scripted is not None:
            text = next(scripted, None)
            if text is None:
                raise SystemExit("error: --scripted-replies ran out of replies; add one for every model call")
            ids = tokenizer.encode(text, allowed_special=set(), disallowed_special=())
            kwargs["logits_processor"] = LogitsProcessorList([ForcedText(ids, tokenizer.im_end_id)])
        reply, _ = model.chat(tokenizer, query, history=history, stop_words_ids=stop_words_ids, **kwargs)
        parsed = parse_react(reply, names)
        if not parsed.is_call:
            print(f"[step {step}] {reply}")
            if "Final Answer:" not in reply:
                print("(the reply is not in the ReAct format: taking it as the answer)")
            return parsed.content or "", trace + reply
        # The model stopped at "Observation:": cut it off, run the tool, give its result.
        thought_and_action = reply[: reply.rfind("Observation:")].rstrip() if "Observation:" in reply else reply
        observation = run_tool(parsed.name, parsed.arguments)
        print(f"[step {step}] {thought_and_action}\nObservation: {observation}")
        trace += f"{thought_and_action}\nObservation: {observation}\n"
    return "(no final answer after --max-steps model calls)", trace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen-7B-Chat", help="a Qwen-1 chat checkpoint (default %(default)s)")
    parser.add_argument(
        "--question",
        action="append",
        help="a question (repeat for a multi-turn chat; default: an arithmetic one and a notes one)",
    )
    parser.add_argument("--max-steps", type=int, default=5, help="most model calls per question (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="reply length cap (default 512)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    parser.add_argument("--scripted-replies", metavar="FILE", help="testing aid: JSON list of replies to force")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    questions = args.question or ["What is 37 * (12 + 5)?", "How do I run Qwen-1 on vLLM?"]
    scripted = None
    if args.scripted_replies:
        try:
            replies = json.loads(Path(args.scripted_replies).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--scripted-replies: {error}")
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            parser.error("--scripted-replies must hold a JSON list of strings")
        scripted = iter(replies)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map=device).eval()
    generate_kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        generate_kwargs["do_sample"] = False

    history: list[tuple[str, str]] = []
    for question in questions:
        print(f"Question: {question}")
        answer, _ = react(
            model, tokenizer, question, history, QWEN_PLUGINS, args.max_steps, scripted, **generate_kwargs
        )
        print(f"Final answer: {answer}\n")
        history.append((question, answer))


if __name__ == "__main__":
    main()
