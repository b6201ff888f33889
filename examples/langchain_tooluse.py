"""Tool use with LangChain 1.x against ``openai_api.py``.

The original notebook used ``initialize_agent`` and ``load_tools``, which LangChain 1.x
removed. Here ``langchain_openai.ChatOpenAI`` talks to the local server (which turns
tools into Qwen's ReAct prompt and back into OpenAI tool calls), in two ways:

1. ``bind_tools``: the model proposes tool calls, this script runs them and sends
   ``ToolMessage`` results back, until the model answers;
2. ``langchain.agents.create_agent``: LangChain's agent runs the same loop itself
   (streamed step by step).

    pip install langchain langchain-openai
    python openai_api.py -c Qwen/Qwen-7B-Chat --server-port 8000
    python examples/langchain_tooluse.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_tools  # noqa: E402

try:
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.errors import GraphRecursionError
except ModuleNotFoundError as error:
    sys.exit(f"error: {error}; install LangChain: pip install langchain langchain-openai")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. '37 * (12 + 5)' or 'sqrt(2) / 3'."""
    return local_tools.run_tool("calculator", {"expression": expression})


@tool
def search_notes(query: str) -> str:
    """Search the local notes about this repository (serving, export, finetuning, tokenizer)."""
    return local_tools.run_tool("search_notes", {"query": query})


TOOLS = [calculator, search_notes]


def bind_tools_loop(llm: ChatOpenAI, question: str, max_rounds: int) -> str:
    """Ask with the tools bound; run each tool call and send its result, until an answer."""
    by_name = {t.name: t for t in TOOLS}
    model = llm.bind_tools(TOOLS)
    messages = [HumanMessage(question)]
    for _ in range(max_rounds):
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return reply.content
        for call in reply.tool_calls:
            result = by_name[call["name"]].invoke(call["args"]) if call["name"] in by_name else "error: no such tool"
            print(f"  tool {call['name']}({call['args']}) -> {result}")
            messages.append(ToolMessage(result, tool_call_id=call["id"]))
    return "(no answer within --max-rounds requests)"


def agent_run(llm: ChatOpenAI, question: str, max_rounds: int) -> str:
    """The same with LangChain's agent (a LangGraph graph: model -> tools -> model ...)."""
    agent = create_agent(llm, tools=TOOLS, system_prompt="You are a helpful assistant. Use the tools when useful.")
    last = None
    # Each model call and each tool run is one step; two steps per round.
    config = {"recursion_limit": 2 * max_rounds + 1}
    updates = agent.stream({"messages": [{"role": "user", "content": question}]}, config, stream_mode="updates")
    try:
        for update in updates:
            for step, state in update.items():
                for message in state["messages"]:
                    calls = getattr(message, "tool_calls", None)
                    shown = f"tool calls {[(c['name'], c['args']) for c in calls]}" if calls else repr(message.content)
                    print(f"  [{step}] {type(message).__name__}: {shown}")
                    last = message
    except GraphRecursionError:
        return "(no answer within --max-rounds model calls)"
    return last.content if last is not None else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server (default %(default)s)")
    parser.add_argument("--model", default="qwen", help="model name sent in requests (default %(default)s)")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--question", default="What is 37 * (12 + 5)?", help="what to ask (default %(default)r)")
    parser.add_argument("--max-rounds", type=int, default=4, help="most model calls per demo (default 4)")
    parser.add_argument("--max-tokens", type=int, default=512, help="reply length cap per request (default 512)")
    args = parser.parse_args(argv)

    llm = ChatOpenAI(
        model=args.model,
        base_url=args.base_url,
        api_key=args.api_key,
        temperature=0,
        max_tokens=args.max_tokens,
        max_retries=0,
    )
    print("== bind_tools")
    print(f"answer: {bind_tools_loop(llm, args.question, args.max_rounds)}")
    print("== create_agent")
    print(f"answer: {agent_run(llm, args.question, args.max_rounds)}")


if __name__ == "__main__":
    main()
