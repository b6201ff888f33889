"""Function calling with the ``openai`` client (>= 1.0) against ``openai_api.py``.

Start the server, then run the examples::

    python openai_api.py -c Qwen/Qwen-7B-Chat --server-port 8000
    python examples/function_call_examples.py --base-url http://127.0.0.1:8000/v1

Four demos, each a full loop (the model asks for a tool, the tool runs here, its result
goes back, the model answers), with the local tools of local_tools.py (a calculator and
a notes search):

1. ``tools``: the current API (``tool_calls`` in the reply, ``role: "tool"`` results);
2. ``functions``: the legacy API (``function_call``, ``role: "function"`` results);
3. Qwen-style plugin definitions (``name_for_human``, ``name_for_model``,
   ``description_for_model``, a parameter list) as legacy ``functions``, as the original
   Qwen server took them;
4. streaming with ``tools``: the tool call arrives as ``delta.tool_calls`` chunks, the
   answer as content chunks.

The server turns the tools into Qwen's ReAct prompt and the model's ReAct reply back into
OpenAI tool calls (see react_prompt.md for what happens underneath).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_tools import FUNCTIONS, QWEN_PLUGINS, TOOLS, run_tool  # noqa: E402

DEMOS = ("tools", "functions", "qwen-plugins", "stream")


def chat_with_tools(client: openai.OpenAI, model: str, question: str, max_rounds: int, **options) -> str:
    """The ``tools`` loop: ask, run every requested tool, send the results, until the
    model answers without a tool call (or ``max_rounds`` requests were made)."""
    messages: list[dict] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, **options)
        message = reply.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))  # the assistant turn with its tool_calls
        for call in message.tool_calls:
            result = run_tool(call.function.name, call.function.arguments)
            print(f"  tool {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return "(no answer within --max-rounds requests)"


def chat_with_functions(
    client: openai.OpenAI, model: str, question: str, functions: list[dict], max_rounds: int, **options
) -> str:
    """The same loop with the legacy ``functions`` / ``function_call`` API."""
    messages: list[dict] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        reply = client.chat.completions.create(
            model=model, messages=messages, functions=functions, function_call="auto", **options
        )
        message = reply.choices[0].message
        if message.function_call is None:
            return message.content or ""
        call = message.function_call
        result = run_tool(call.name, call.arguments)
        print(f"  function {call.name}({call.arguments}) -> {result}")
        messages.append(
            {
                "role": "assistant",
                "content": message.content,
                "function_call": {"name": call.name, "arguments": call.arguments},
            }
        )
        messages.append({"role": "function", "name": call.name, "content": result})
    return "(no answer within --max-rounds requests)"


def stream_with_tools(client: openai.OpenAI, model: str, question: str, max_rounds: int, **options) -> str:
    """The ``tools`` loop with ``stream=True``: tool calls are put together from their
    chunks (by ``index``), the final answer is printed as it arrives."""
    messages: list[dict] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        content, calls = "", {}
        print("  streamed: ", end="", flush=True)
        for chunk in client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, stream=True, **options
        ):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                content += delta.content
                print(delta.content, end="", flush=True)
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
        print()
        if not calls:
            return content
        messages.append(
            {
                "role": "assistant",
                "content": content or None,
                "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls.values()
                ],
            }
        )
        for call in calls.values():
            result = run_tool(call["name"], call["arguments"])
            print(f"  tool {call['name']}({call['arguments']}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return "(no answer within --max-rounds requests)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server (default %(default)s)")
    parser.add_argument("--model", default="qwen", help="model name sent in requests (default %(default)s)")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--demo", action="append", choices=DEMOS, help="run only these demos (repeatable)")
    parser.add_argument("--question", default="What is 37 * (12 + 5)?", help="what to ask (default %(default)r)")
    parser.add_argument("--max-rounds", type=int, default=4, help="most requests per demo (default 4)")
    parser.add_argument("--max-tokens", type=int, default=512, help="reply length cap per request (default 512)")
    args = parser.parse_args(argv)

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    options = {"temperature": 0, "max_tokens": args.max_tokens}
    try:
        client.models.list()
    except openai.APIConnectionError:
        sys.exit(f"error: no server at {args.base_url}; start one with: python openai_api.py -c CHECKPOINT")
    for demo in args.demo or DEMOS:
        print(f"== {demo}")
        if demo == "tools":
            answer = chat_with_tools(client, args.model, args.question, args.max_rounds, **options)
        elif demo == "functions":
            answer = chat_with_functions(client, args.model, args.question, FUNCTIONS, args.max_rounds, **options)
        elif demo == "qwen-plugins":
            answer = chat_with_functions(client, args.model, args.question, QWEN_PLUGINS, args.max_rounds, **options)
        else:
            answer = stream_with_tools(client, args.model, args.question, args.max_rounds, **options)
        print(f"answer: {answer}")


if __name__ == "__main__":
    main()
