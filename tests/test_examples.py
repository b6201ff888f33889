"""examples/ end to end (issue 27): every script runs as a subprocess, every Markdown
guide's ```python blocks run in order, on a tiny random chat checkpoint, offline.

The clients are the real ones (the ``openai`` package, LangChain's ``ChatOpenAI`` and
agent, smolagents) against a real ``openai_api.py`` process. A random model never writes
a ReAct tool call, so where an example needs one, the model's output is forced:

* against the server, through a small HTTP proxy in this process that adds the server's
  test hook ``forced_output`` (``--enable-test-hooks``) to each chat request, chosen from
  the request (a tool call first, the final answer once a tool result came back) and
  records every request, so the tests can check what the example sent (that the tool
  really ran, with the arguments the "model" gave);
* without a server (react_demo.py), through the example's ``--scripted-replies`` hook, a
  logits processor that leaves one token allowed at each step.

Either way the model runs every step and everything around it is the real code: prompt
building, stop words, the server's ReAct parsing and streaming, the clients' tool loops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import REPO
from test_openai_api import Server

EXAMPLES = REPO / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
GUIDES = sorted(p.name for p in EXAMPLES.glob("*.md") if p.name != "README.md")
QUESTION = "What is 37 * (12 + 5)?"
CALL = 'Thought: I should use the calculator.\nAction: calculator\nAction Input: {"expression": "37 * (12 + 5)"}'
# After a tool result the server has the model continue from "Thought:".
FINAL = " I now know the final answer\nFinal Answer: The result is 629."


def _load(name: str):
    """An example as a module (examples/ on the path, as when it runs as a script)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python *args`` in the repository; fail with its output unless it exits 0."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=environment, timeout=timeout
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# --------------------------------------------------------------------------- server and proxy


class ScriptedProxy:
    """Forwards HTTP to ``upstream``; each chat request gets ``forced_output`` from
    ``script(request body)`` (None: the model's own output) and is recorded in ``requests``."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.script: Callable[[dict], str | None] | None = None
        self.requests: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if method == "POST" and self.path.endswith("/chat/completions"):
                    data = json.loads(body)
                    proxy.requests.append(data)
                    forced = proxy.script(data) if proxy.script else None
                    if forced is not None:
                        data["forced_output"] = forced
                    body = json.dumps(data).encode()
                skip = ("host", "content-length", "connection", "accept-encoding")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                with (
                    httpx.Client(timeout=120) as client,
                    client.stream(method, proxy.upstream + self.path, content=body or None, headers=headers) as reply,
                ):
                    self.send_response(reply.status_code)
                    for key, value in reply.headers.items():
                        if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for chunk in reply.iter_raw():  # server-sent events pass through as they come
                        self.wfile.write(chunk)
                        self.wfile.flush()
                self.close_connection = True

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def use(self, script: Callable[[dict], str | None]) -> None:
        self.script = script
        self.requests = []

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    srv = Server(tiny_chat_dir, tmp_path_factory.mktemp("examples") / "server.log", "--enable-test-hooks")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proxy(server):
    scripted = ScriptedProxy(server.url)
    yield scripted
    scripted.close()


def _text(message: dict) -> str:
    content = message.get("content") or ""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def call_then_answer(request: dict) -> str:
    """A calculator call, or the final answer once the last message is a tool result."""
    return FINAL if request["messages"][-1]["role"] in ("tool", "function") else CALL


# --------------------------------------------------------------------------- every example


def test_every_example_is_listed_and_has_help():
    readme = (EXAMPLES / "README.md").read_text()
    for name in SCRIPTS + GUIDES:
        assert f"({name})" in readme, f"examples/README.md does not list {name}"
    # --help of every script, in one process (importing torch once): argparse, exit 0.
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, 'examples')\n"
        f"for name in {SCRIPTS!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_path('examples/' + name, run_name='__main__')\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code in (0, None), (name, stop.code)\n"
        "    else:\n"
        "        raise AssertionError(name + ': --help did not exit')\n"
        "    print('HELP-OK', name)\n"
    )
    shown = run("-c", code).stdout
    for name in SCRIPTS:
        assert f"HELP-OK {name}" in shown
    assert shown.count("usage: ") == len(SCRIPTS)
    assert "--scripted-replies" in shown and "--base-url" in shown and "--export-dir" in shown


def test_local_tools_calculate_and_search():
    tools = _load("local_tools")
    assert tools.calculate("37 * (12 + 5)") == "629"
    assert tools.calculate("2^10 / 4") == "256"  # ^ is a power; an integral result prints as one
    assert tools.calculate("1,000 + 7 % 4") == "1003"
    assert tools.calculate("-(3 - 10) // 2") == "3"
    assert tools.calculate("sqrt(16) + abs(-2.5)") == "6.5"
    assert float(tools.calculate("2 * pi")) == pytest.approx(6.283185307179586)
    for bad in ("__import__('os')", "().__class__", "x + 1", "open('f')", "9 ** 9 ** 9", "(10 ** 999) ** 999", "1/0"):
        with pytest.raises(ValueError):
            tools.calculate(bad)
    assert tools.run_tool("calculator", '{"expression": "1/0"}') == "error: division by zero"
    assert tools.run_tool("calculator", "not json").startswith("error: the arguments are not JSON")
    assert tools.run_tool("nope", {}).startswith("error: unknown tool")
    found = tools.search_notes("export to vLLM")
    assert found.startswith("export: python -m qwen convert-qwen2")
    assert tools.search_notes("zebra") == "no note matches 'zebra'"


def test_quickstart(tiny_chat_dir):
    shown = run("examples/quickstart.py", str(tiny_chat_dir), "--max-new-tokens", "4").stdout
    for label in ("turn 1:", "turn 2:", "system prompt:", "streaming:", "batch 0:", "batch 1:"):
        assert label in shown


def test_react_demo_runs_the_tools(tiny_chat_dir, tmp_path):
    replies = [
        CALL,  # the forced text, then <|im_end|>
        "Thought: I now know the final answer\nFinal Answer: 629",
        # generation stops at the stop word "Observation:"
        'Thought: Let me look this up.\nAction: search_notes\nAction Input: {"query": "vLLM export"}\nObservation:',
        "Thought: I now know the final answer\nFinal Answer: export it with convert-qwen2",
        "Hello!",  # not in the ReAct format, as a random model writes: taken as the answer
    ]
    script = tmp_path / "replies.json"
    script.write_text(json.dumps(replies))
    args = ["examples/react_demo.py", "--model", str(tiny_chat_dir), "--scripted-replies", str(script)]
    questions = ["--question", QUESTION, "--question", "How do I run Qwen-1 on vLLM?", "--question", "Hi"]
    shown = run(*args, *questions, "--max-new-tokens", "64").stdout
    assert f"Question: {QUESTION}\n[step 1] {CALL}\nObservation: 629\n" in shown
    assert "Final answer: 629\n" in shown
    assert "Observation: export: python -m qwen convert-qwen2" in shown  # the real search ran
    assert "Final answer: export it with convert-qwen2\n" in shown
    assert (
        "[step 1] Hello!\n(the reply is not in the ReAct format: taking it as the answer)\nFinal answer: Hello!"
        in shown
    )


def test_function_call_examples(proxy):
    proxy.use(call_then_answer)
    shown = run("examples/function_call_examples.py", "--base-url", proxy.url, "--max-tokens", "64").stdout
    for demo in ("tools", "functions", "qwen-plugins", "stream"):
        assert f"== {demo}\n" in shown
    assert shown.count('({"expression": "37 * (12 + 5)"}) -> 629') == 4
    assert shown.count("answer: The result is 629.\n") == 4
    assert "  streamed: The result is 629.\n" in shown  # the answer arrived as content chunks

    tools_call, tools_result, functions_call, functions_result, qwen_call, qwen_result, stream_call, stream_result = (
        proxy.requests
    )
    assert [t["function"]["name"] for t in tools_call["tools"]] == ["calculator", "search_notes"]
    assistant, tool = tools_result["messages"][1:]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression": "37 * (12 + 5)"}',
    }
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "629"}
    assert functions_call["function_call"] == "auto" and functions_call["functions"][0]["name"] == "calculator"
    assert functions_result["messages"][-1] == {"role": "function", "name": "calculator", "content": "629"}
    assert qwen_call["functions"][0]["name_for_model"] == "calculator"
    assert qwen_result["messages"][-1]["content"] == "629"
    assert stream_call["stream"] is True and stream_result["stream"] is True
    streamed_call = stream_result["messages"][1]["tool_calls"][0]
    assert streamed_call["id"].startswith("call_") and streamed_call["function"]["name"] == "calculator"
    assert stream_result["messages"][2] == {"role": "tool", "tool_call_id": streamed_call["id"], "content": "629"}


def test_langchain_tooluse(proxy):
    proxy.use(call_then_answer)
    shown = run("examples/langchain_tooluse.py", "--base-url", proxy.url, "--max-tokens", "64").stdout
    assert (
        "== bind_tools\n  tool calculator({'expression': '37 * (12 + 5)'}) -> 629\nanswer: The result is 629.\n"
        in shown
    )
    assert "[model] AIMessage: tool calls [('calculator', {'expression': '37 * (12 + 5)'})]" in shown
    assert "[tools] ToolMessage: '629'" in shown
    assert shown.endswith("answer: The result is 629.\n")
    assert len(proxy.requests) == 4
    for request in proxy.requests:  # LangChain's tool schemas, from the @tool functions
        assert {t["function"]["name"] for t in request["tools"]} == {"calculator", "search_notes"}
        assert request["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    agent_result = proxy.requests[3]["messages"]
    assert agent_result[0]["role"] == "system" and agent_result[-1]["role"] == "tool"
    assert agent_result[-1]["content"] == "629"
    assert agent_result[-1]["tool_call_id"] == agent_result[-2]["tool_calls"][0]["id"]


def test_agent_example(proxy):
    """smolagents' ToolCallingAgent: it sends tool results back as user messages
    ("Observation: ...") and ends when the model calls its final_answer tool."""

    def script(request: dict) -> str:
        if _text(request["messages"][-1]).startswith("Observation:"):
            return 'Thought: I now know the final answer\nAction: final_answer\nAction Input: {"answer": "629"}'
        return CALL

    proxy.use(script)
    shown = run("examples/agent_example.py", "--base-url", proxy.url, "--max-tokens", "64", "--quiet").stdout
    assert shown.endswith("answer: 629\n")
    first, second = proxy.requests
    assert {t["function"]["name"] for t in first["tools"]} == {"calculator", "search_notes", "final_answer"}
    assert _text(first["messages"][-1]).endswith(QUESTION)
    assert _text(second["messages"][-1]) == "Observation:\n629"  # the calculator really ran


def test_function_call_finetune_examples(tiny_chat_dir, tmp_path):
    from transformers import AutoTokenizer

    from qwen.finetune_data import IGNORE_INDEX, encode_conversation, load_conversations
    from qwen.qwen_generation_utils import make_context
    from qwen.serving.function_call import build_chat_prompt, select_functions

    output = tmp_path / "samples.json"
    run("examples/function_call_finetune_examples.py", "--output", str(output))
    conversations = load_conversations(output)  # finetune.py's validation
    assert [c.id for c in conversations] == ["calculator-one-call", "two-tools-in-a-row", "multi-round"]
    first = conversations[0].messages
    assert first[1] == (
        "assistant",
        "Thought: I should compute this with the calculator.\nAction: calculator\n"
        'Action Input: {"expression": "37 * (12 + 5)"}\nObservation: 629\n'
        "Thought: I now know the final answer\nFinal Answer: 37 * (12 + 5) = 629.",
    )
    assert first[0][1].startswith("Answer the following questions as best you can.")
    assert first[0][1].endswith(f"\n\nQuestion: {QUESTION}")
    second = conversations[1]
    assert second.system == "You are a concise assistant for the qwen repository."
    assert "Observation: export: python -m qwen convert-qwen2" in second.messages[1][1]
    assert "Observation: 1024\n" in second.messages[1][1]
    third = conversations[2].messages
    assert [role for role, _ in third] == ["user", "assistant"] * 3
    assert third[0][1] == "123 + 456 = ?" and "Observation: 579\n" in third[1][1]
    assert "Observation: 1158\n" in third[5][1] and third[4][1].startswith("Answer the following questions")

    # Trained on exactly what the server shows the model: the server's prompt for the
    # transcript up to the tool result is a prefix of the training sample's tokens, and
    # what follows it (the model's part) is trained.
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    example = _load("function_call_finetune_examples")
    transcript = example.TRANSCRIPTS[0]
    functions, _ = select_functions(tools=transcript["tools"])
    prompt = build_chat_prompt(example.fill_tool_results(transcript["messages"])[:-1], functions)
    _, served = make_context(tokenizer, prompt.query, prompt.history, prompt.system, None, "chatml")
    served = served + tokenizer.encode(prompt.prefill, allowed_special=set(), disallowed_special=())
    assert prompt.prefill.endswith("Observation: 629\nThought:")
    encoded = encode_conversation(conversations[0], tokenizer)
    assert encoded["input_ids"][: len(served)] == served
    answer = tokenizer.decode(encoded["input_ids"][len(served) :])
    assert answer == " I now know the final answer\nFinal Answer: 37 * (12 + 5) = 629.<|im_end|>\n"
    assert IGNORE_INDEX not in encoded["labels"][len(served) :]
    for conversation in conversations:
        encode_conversation(conversation, tokenizer, max_len=2048)


def test_qwen2_export_vllm(tiny_chat_dir, tmp_path):
    """The export through plain transformers (no vLLM here) answers as the Qwen-1 model
    itself does: greedy, two turns, the same text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = tmp_path / "qwen2"
    queries = ["你好", "Tell me more."]
    args = ["examples/qwen2_export_vllm.py", "--model", str(tiny_chat_dir), "--export-dir", str(export_dir)]
    args += ["--dtype", "fp32", "--greedy", "--max-new-tokens", "8", "--backend", "transformers"]
    shown = run(*args, "--query", queries[0], "--query", queries[1]).stdout
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert "backend: transformers\n" in shown

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    chat = _load("qwen2_export_vllm").Qwen2Chat(export_dir, "transformers", max_new_tokens=8, greedy=True)
    assert type(chat.model).__name__ == "Qwen2ForCausalLM"
    history, reference_history = [], []
    for query in queries:
        reference, reference_history = model.chat(
            tokenizer, query, history=reference_history, max_new_tokens=8, do_sample=False
        )
        response, history = chat.chat(query, history)
        assert response == reference
        assert f"user: {query}\nassistant: {reference}\n" in shown
    assert history == reference_history
    responses, _ = chat.chat_batch(queries, [None, None], system="Be brief.")
    assert responses == [
        model.chat(tokenizer, q, system="Be brief.", max_new_tokens=8, do_sample=False)[0] for q in queries
    ]


# --------------------------------------------------------------------------- Markdown guides

# Runs a guide's ```python blocks in order as one program, each line at its line number in
# the guide (tracebacks point into the .md file). Replies are capped at a few tokens
# once the guide has loaded `model` (the random model would otherwise write 512).
GUIDE_RUNNER = """
import sys
path = sys.argv[1]
lines = open(path, encoding="utf-8").read().splitlines()
code = [""] * len(lines)
inside, capped = False, False
for number, line in enumerate(lines):
    if not inside and line.strip() == "```python":
        inside = True
    elif inside and line.strip() == "```":
        inside = False
        if not capped:
            code[number] = "if 'model' in globals(): model.generation_config.max_new_tokens = 8"
            capped = True
    elif inside:
        code[number] = line
exec(compile("\\n".join(code), path, "exec"), {"__name__": "__main__"})
print("GUIDE-OK")
"""


@pytest.mark.parametrize("guide", GUIDES)
def test_markdown_guide(guide, tiny_chat_dir, server):
    text = (EXAMPLES / guide).read_text()
    assert text.count("```python") >= 3
    env = {"QWEN_MODEL": str(tiny_chat_dir), "QWEN_BASE_URL": f"{server.url}/v1"}
    shown = run("-c", GUIDE_RUNNER, f"examples/{guide}", env=env).stdout
    assert shown.endswith("GUIDE-OK\n")
    if guide == "react_prompt.md":
        assert "\n629\n" in shown  # the calculator ran on the parsed action
    if guide == "system_prompt.md":
        assert "<|im_start|>system\nTalk like a pirate.<|im_end|>" in shown
