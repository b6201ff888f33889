"""Two small local tools that the tool-use examples give the model: a safe calculator and a
search over a few notes. No network, no ``eval``: the examples run offline.

The other examples import this file (run them from anywhere: they add their own folder to
the import path), each describing the tools in its library's own way (OpenAI JSON
schemas, Qwen-style plugin definitions, LangChain or smolagents tools).

    python examples/local_tools.py calculate "2 * (3 + 4) ** 2"
    python examples/local_tools.py search "export to vLLM"
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import re
from typing import Any

# --------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "exp": math.exp}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # 10 ** 100000 would keep the CPU busy for nothing
MAX_BITS = 100_000  # nor may a power of a big number grow past this many bits
MAX_LENGTH = 500


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses, the
    functions sqrt, abs, round, log, exp and the constants pi and e. ``^`` is read as a
    power, ``×``/``÷`` as * and /, and thousands separators ``1,000`` are dropped.
    Raises ValueError for anything else (names, calls of other functions, attributes)."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    if not text:
        raise ValueError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (
            abs(right) > MAX_EXPONENT or (isinstance(left, int) and left.bit_length() * abs(right) > MAX_BITS)
        ):
            raise ValueError(f"{ast.unparse(node)!r} is too large to compute")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        try:
            return _FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{node.func.id}(): {error}") from None
    raise ValueError(f"not allowed in an arithmetic expression: {ast.unparse(node)!r}")


# --------------------------------------------------------------------------- notes search

NOTES = {
    "serving": "openai_api.py serves a Qwen-1 chat model over the OpenAI API (chat completions with tools and "
    "legacy functions, completions, streaming) with continuous batching on CPU or GPU.",
    "function calling": "Qwen-1 chat models call tools through a ReAct prompt: Thought, Action, Action Input, "
    "then the caller adds an Observation with the tool's result, until the model writes a Final Answer.",
    "export": "python -m qwen convert-qwen2 SRC DST rewrites a Qwen-1 checkpoint as a Qwen2ForCausalLM one, "
    "which vLLM, SGLang and llama.cpp load natively.",
    "finetuning": "finetune.py trains Qwen-1 with LoRA, Q-LoRA or full finetuning on conversations in the "
    "original Qwen format or as OpenAI-style messages.",
    "tokenizer": "The Qwen tokenizer is byte-level BPE with 151643 regular tokens and 208 special tokens, "
    "such as <|endoftext|>, <|im_start|> and <|im_end|>.",
    "web demo": "web_demo.py is a browser chat on gradio with streaming, a system prompt and generation settings.",
}

_WORD = re.compile(r"\w+")


def search_notes(query: str, k: int = 2) -> str:
    """The ``k`` notes sharing the most words with ``query`` (title words count twice), as
    ``title: text`` lines; a line saying so when none shares a word."""
    words = {w.lower() for w in _WORD.findall(query)}
    if not words:
        raise ValueError("empty search query")
    scored = []
    for title, text in NOTES.items():
        title_words = {w.lower() for w in _WORD.findall(title)}
        text_words = {w.lower() for w in _WORD.findall(text)}
        score = 2 * len(words & title_words) + len(words & text_words)
        if score:
            scored.append((-score, title))
    if not scored:
        return f"no note matches {query!r}"
    return "\n".join(f"{title}: {NOTES[title]}" for _, title in sorted(scored)[:k])


# --------------------------------------------------------------------------- descriptions

# OpenAI function definitions (JSON Schema parameters): the `tools` / `functions` of a request.
FUNCTIONS = [
    {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly, e.g. '37 * (12 + 5)' or 'sqrt(2) / 3'.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "the expression to evaluate"}},
            "required": ["expression"],
        },
    },
    {
        "name": "search_notes",
        "description": "Search the local notes about this repository (serving, export, finetuning, tokenizer).",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "keywords to look for"}},
            "required": ["query"],
        },
    },
]
TOOLS = [{"type": "function", "function": definition} for definition in FUNCTIONS]

# The same two tools as the original Qwen plugin definitions (what the ReAct prompt shows).
QWEN_PLUGINS = [
    {
        "name_for_human": "Calculator",
        "name_for_model": "calculator",
        "description_for_model": "Calculator evaluates arithmetic expressions exactly, e.g. 37 * (12 + 5).",
        "parameters": [
            {
                "name": "expression",
                "description": "the arithmetic expression to evaluate",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
    {
        "name_for_human": "Notes Search",
        "name_for_model": "search_notes",
        "description_for_model": "Notes Search finds local notes about this repository: serving, export, "
        "finetuning, the tokenizer.",
        "parameters": [
            {"name": "query", "description": "keywords to look for", "required": True, "schema": {"type": "string"}}
        ],
    },
]

IMPLEMENTATIONS = {"calculator": ("expression", calculate), "search_notes": ("query", search_notes)}


def run_tool(name: str, arguments: str | dict[str, Any]) -> str:
    """Run tool ``name`` with ``arguments`` (a JSON object, as text or parsed) and return
    its result as text; a problem (unknown tool, bad arguments, a failing expression) is
    returned as ``error: ...`` text, which is what the model should see as the observation."""
    if name not in IMPLEMENTATIONS:
        return f"error: unknown tool {name!r}; available: {', '.join(IMPLEMENTATIONS)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return f"error: the arguments are not JSON ({error})"
    key, function = IMPLEMENTATIONS[name]
    if not isinstance(arguments, dict) or not isinstance(arguments.get(key), str):
        return f"error: {name} takes a JSON object with a string {key!r}"
    try:
        return function(arguments[key])
    except ValueError as error:
        return f"error: {error}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tool", choices=["calculate", "search"], help="which tool to run")
    parser.add_argument("text", help="the expression or the search query")
    args = parser.parse_args(argv)
    name, key = ("calculator", "expression") if args.tool == "calculate" else ("search_notes", "query")
    print(run_tool(name, {key: args.text}))


if __name__ == "__main__":
    main()
