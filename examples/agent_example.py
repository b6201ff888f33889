"""An agent on a Qwen-1 chat model: smolagents against ``openai_api.py``.

``transformers.Agent`` (the original example) is gone from transformers 5; its successor
is `smolagents <https://github.com/huggingface/smolagents>`_, which talks to any
OpenAI-compatible server. Its ``ToolCallingAgent`` sends the tools as OpenAI ``tools``
(the server turns them into Qwen's ReAct prompt and the model's ReAct reply back into
tool calls), runs each tool call, and ends when the model calls the built-in
``final_answer`` tool.

    pip install smolagents
    python openai_api.py -c Qwen/Qwen-7B-Chat --server-port 8000
    python examples/agent_example.py --base-url http://127.0.0.1:8000/v1 \\
        --task "What is 37 * (12 + 5)? Then tell me which command exports a checkpoint for vLLM."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_tools  # noqa: E402

try:
    from smolagents import OpenAIServerModel, ToolCallingAgent, tool
except ModuleNotFoundError as error:
    sys.exit(f"error: {error}; install smolagents: pip install smolagents")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: the expression to evaluate, e.g. '37 * (12 + 5)' or 'sqrt(2) / 3'.
    """
    return local_tools.run_tool("calculator", {"expression": expression})


@tool
def search_notes(query: str) -> str:
    """Search the local notes about this repository (serving, export, finetuning, tokenizer).

    Args:
        query: keywords to look for.
    """
    return local_tools.run_tool("search_notes", {"query": query})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server (default %(default)s)")
    parser.add_argument("--model", default="qwen", help="model name sent in requests (default %(default)s)")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--task", default="What is 37 * (12 + 5)?", help="the agent's task (default %(default)r)")
    parser.add_argument("--max-steps", type=int, default=4, help="most agent steps (default 4)")
    parser.add_argument("--max-tokens", type=int, default=512, help="reply length cap per request (default 512)")
    parser.add_argument("--quiet", action="store_true", help="print the answer only, not every step")
    args = parser.parse_args(argv)

    model = OpenAIServerModel(
        model_id=args.model,
        api_base=args.base_url,
        api_key=args.api_key,
        client_kwargs={"max_retries": 0},
        temperature=0,
        max_tokens=args.max_tokens,
    )
    agent = ToolCallingAgent(
        tools=[calculator, search_notes],
        model=model,
        max_steps=args.max_steps,
        verbosity_level=0 if args.quiet else 1,
    )
    answer = agent.run(args.task)
    print(f"answer: {answer}")


if __name__ == "__main__":
    main()
