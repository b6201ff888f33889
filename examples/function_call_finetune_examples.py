"""Finetuning samples for tool use: OpenAI-style transcripts in, Qwen's ReAct training format out.

Qwen-1's function calling is ReAct prompting (see react_prompt.md): there is no ``tool``
role in its training data. The question carries the tool descriptions and the format;
the assistant's turn holds the whole Thought / Action / Action Input / Observation trace
and the Final Answer. This script writes such samples from transcripts kept the OpenAI
way (``tool_calls`` and ``tool`` results; legacy ``function_call`` / ``function`` works
too), rendered by the very function that renders the server's requests
(``qwen.serving.function_call.build_chat_prompt``), so the model is trained on exactly
the text it sees when served. Tool results left empty (``"content": None``) are
filled in by running the local tools of local_tools.py.

    python examples/function_call_finetune_examples.py --output tool_use_samples.json
    python finetune.py --model_name_or_path Qwen/Qwen-7B-Chat --data_path tool_use_samples.json ...

The output is a JSON list of samples in the original Qwen format, ``{"id": ...,
"conversations": [{"from": "user", "value": ...}, {"from": "assistant", "value": ...}]}``
(with a first ``system`` turn where a transcript has its own system prompt), which
finetune.py reads and validates.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from qwen.qwen_generation_utils import DEFAULT_SYSTEM
from qwen.serving.function_call import build_chat_prompt, select_functions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_tools import QWEN_PLUGINS, TOOLS, run_tool  # noqa: E402


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# Each transcript: the tools offered (OpenAI `tools`, or legacy `functions`: OpenAI or
# Qwen-style definitions) and the messages, ending with the assistant's answer.
TRANSCRIPTS = [
    {
        "id": "calculator-one-call",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "What is 37 * (12 + 5)?"},
            {
                "role": "assistant",
                "content": "I should compute this with the calculator.",
                "tool_calls": [_call("calculator", expression="37 * (12 + 5)")],
            },
            {"role": "tool", "content": None},
            {"role": "assistant", "content": "37 * (12 + 5) = 629."},
        ],
    },
    {
        "id": "two-tools-in-a-row",
        "functions": QWEN_PLUGINS,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for the qwen repository."},
            {"role": "user", "content": "Which command exports a checkpoint for vLLM, and what is 2 ** 10?"},
            {
                "role": "assistant",
                "content": "First I look up the export in the notes.",
                "function_call": {"name": "search_notes", "arguments": '{"query": "export vLLM"}'},
            },
            {"role": "function", "name": "search_notes", "content": None},
            {
                "role": "assistant",
                "content": "Now the power of two.",
                "function_call": {"name": "calculator", "arguments": '{"expression": "2 ** 10"}'},
            },
            {"role": "function", "name": "calculator", "content": None},
            {
                "role": "assistant",
                "content": "Run `python -m qwen convert-qwen2 SRC DST`, then load DST in vLLM. 2 ** 10 = 1024.",
            },
        ],
    },
    {
        "id": "multi-round",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "123 + 456 = ?"},
            {
                "role": "assistant",
                "content": "I add them.",
                "tool_calls": [_call("calculator", expression="123 + 456")],
            },
            {"role": "tool", "content": None},
            {"role": "assistant", "content": "579"},
            {"role": "user", "content": "Thanks! You are quick."},  # no tool needed for this one
            {"role": "assistant", "content": "You are welcome."},
            {"role": "user", "content": "Multiply the result by 2."},
            {
                "role": "assistant",
                "content": "I multiply 579 by 2.",
                "tool_calls": [_call("calculator", expression="579 * 2")],
            },
            {"role": "tool", "content": None},
            {"role": "assistant", "content": "1158"},
        ],
    },
]


def fill_tool_results(messages: list[dict]) -> list[dict]:
    """A copy of ``messages`` where each empty tool (or function) result is the output of
    running the call it answers, and tool results carry the id of their call."""
    messages = copy.deepcopy(messages)
    pending: list[dict] = []
    for message in messages:
        if message["role"] == "assistant":
            pending = []
            for k, call in enumerate(message.get("tool_calls") or []):
                call.setdefault("id", f"call_{k}")
                pending.append({"id": call["id"], **call["function"]})
            if message.get("function_call"):
                pending.append({"id": None, **message["function_call"]})
        elif message["role"] in ("tool", "function"):
            if not pending:
                raise ValueError("a tool result without a tool call before it")
            call = pending.pop(0)
            if message.get("content") is None:
                message["content"] = run_tool(call["name"], call["arguments"])
            if message["role"] == "tool":
                message.setdefault("tool_call_id", call["id"])
    return messages


def to_training_sample(transcript: dict) -> dict:
    """One transcript as a sample in the original Qwen format, rendered as the server
    renders requests: the ReAct instruction before the last question, each assistant turn
    as its Thought/Action/Observation trace ending with the Final Answer."""
    messages = transcript["messages"]
    if not messages or messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
        raise ValueError(f"transcript {transcript.get('id')!r} must end with the assistant's answer")
    functions, _ = select_functions(tools=transcript.get("tools"), functions=transcript.get("functions"))
    prompt = build_chat_prompt(fill_tool_results(messages), functions)
    turns = []
    if prompt.system != DEFAULT_SYSTEM:
        turns.append({"from": "system", "value": prompt.system})
    for user, assistant in [*prompt.history, (prompt.query, prompt.prefill)]:
        turns += [{"from": "user", "value": user}, {"from": "assistant", "value": assistant}]
    return {"id": transcript.get("id"), "conversations": turns}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", default="tool_use_samples.json", help="the JSON file to write (default %(default)s)"
    )
    parser.add_argument(
        "--transcripts",
        metavar="FILE",
        help="your own transcripts: a JSON list of {id, tools or functions, messages} (default: the built-in ones)",
    )
    parser.add_argument("--print", action="store_true", help="also print the first sample's turns")
    args = parser.parse_args(argv)

    transcripts = TRANSCRIPTS
    if args.transcripts:
        try:
            transcripts = json.loads(Path(args.transcripts).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--transcripts: {error}")
        if not isinstance(transcripts, list):
            parser.error("--transcripts must hold a JSON list of transcripts")
    samples = []
    for index, transcript in enumerate(transcripts):
        try:
            samples.append(to_training_sample(transcript))
        except (ValueError, KeyError, TypeError) as error:
            sys.exit(f"error: transcript {index} ({transcript.get('id', 'no id')}): {error}")
    Path(args.output).write_text(json.dumps(samples, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(samples)} samples to {args.output}")
    if args.print:
        for turn in samples[0]["conversations"]:
            print(f"--- {turn['from']}\n{turn['value']}")


if __name__ == "__main__":
    main()
