"""A GPTQ Int4 chat checkpoint in the official layout (the integers packed by hand,
tests/test_quantization.py) through the entry points users run on CPU: openai_api.py with the
openai client (one request, concurrent requests that the server batches, a stream) against
``model.chat`` in this process, and cli_demo.py in a terminal. The web demo loads and
generates through the server's engine (``qwen.serving.app.load_engine``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import needs_compiler
from test_openai_api import GREEDY, Server
from test_quantization import official_layout_pair

from qwen import QWenLMHeadModel, QWenTokenizer, cpu_engine

pytest.importorskip("optimum", reason="the gptq extra (optimum, gptqmodel) is not installed")
pytest.importorskip("gptqmodel", reason="the gptq extra (optimum, gptqmodel) is not installed")

QUESTIONS = ["Hello, who are you?", "Name a colour.", "What is 1+1?", "Write a word."]


@pytest.fixture(scope="module")
def int4_chat(tiny_chat_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("int4-chat")
    quant, _ = official_layout_pair(tiny_chat_dir, base / "int4", base / "ref", 4)
    return quant


@pytest.fixture(scope="module")
def expected(int4_chat):
    """Greedy replies of ``model.chat`` on the checkpoint loaded as users load it (float32,
    as the server below runs it)."""
    model = QWenLMHeadModel.from_pretrained(int4_chat, fp32=True).eval()
    assert isinstance(model.transformer.h[0].attn.c_attn, cpu_engine.CPUGPTQLinear)
    tok = QWenTokenizer.from_pretrained(int4_chat)
    return [
        model.chat(tok, q, history=None, do_sample=False, max_new_tokens=8, repetition_penalty=1.0)[0]
        for q in QUESTIONS
    ]


@needs_compiler
def test_server_on_an_int4_checkpoint(int4_chat, expected, tmp_path):
    server = Server(int4_chat, tmp_path / "log.txt")
    try:
        client = server.client()

        def ask(question: str) -> str:
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8, **GREEDY)
            return reply.choices[0].message.content

        assert ask(QUESTIONS[0]) == expected[0]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # batched steps: several rows per product
            assert list(pool.map(ask, QUESTIONS)) == expected
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=8, stream=True, **GREEDY
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected[1]
        assert server.wait_idle()["status"] == "ok"
    finally:
        server.stop()


@needs_compiler
def test_cli_demo_on_an_int4_checkpoint(int4_chat, expected):
    """The terminal session (float32 on CPU, as the server): greedy settings, the answer
    streamed as ``model.chat`` gives it."""
    from test_cli_demo import ask, at_prompt, command, spawn

    child = spawn(int4_chat)
    try:
        at_prompt(child)
        assert "max_new_tokens = 8" in command(child, ":conf max_new_tokens=8 do_sample=False repetition_penalty=1.0")
        assert ask(child, QUESTIONS[2]) == expected[2]
    finally:
        child.close(force=True)
