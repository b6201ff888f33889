"""The OpenAI-compatible server's contract: what a client sees when things go wrong, the
documented refusals, and the options that only show over HTTP.

Expectations are OpenAI's (the error shape ``{"error": {"message", "type", "param",
"code"}}``, 500 for a failed generation and an error event in a stream, the ``openai``
package's exceptions) and hand-written references (a greedy ``model.generate`` with the
penalties written out here; the prefill groups worked out by hand), never the server's
own output. Most tests drive ``create_app`` in process (FastAPI's ``TestClient``) over an
:class:`~qwen.serving.engine.Engine`; the command-line options are checked on a real
``openai_api.py`` process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from conftest import REPO
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import qwen  # noqa: F401  (registers the Auto classes)
from qwen.qwen_generation_utils import make_context
from qwen.serving.app import MAX_STOP_STRINGS, create_app
from qwen.serving.engine import Engine, SamplingParams

SYSTEM = "You are a helpful assistant."
ERROR_KEYS = {"message", "type", "param", "code"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="module")
def model(tiny_chat_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()


@contextmanager
def served(model, tok, **app_kwargs) -> Iterator[TestClient]:
    """A TestClient over a fresh engine (started and stopped by the app's lifespan);
    unhandled server errors come back as responses, as a client would see them."""
    engine = Engine(model, tok, max_batch_size=4)
    with TestClient(create_app(engine, **app_kwargs), raise_server_exceptions=False) as client:
        client.engine = engine
        yield client


def openai_client(client: TestClient) -> openai.OpenAI:
    """The official client, talking to the in-process app."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def error_of(response, status: int) -> dict:
    """The error object of an OpenAI-shaped error reply with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def sse_events(response) -> list:
    """The ``data:`` payloads of a server-sent-event reply, JSON-decoded ("[DONE]" kept)."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --------------------------------------------------------------------------- a failed generation


@pytest.fixture
def failing_model(model, monkeypatch):
    """The model, whose forward fails from its ``fail_from``-th call on (1: the prefill)."""
    calls = {"n": 0, "fail_from": 1}
    forward = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= calls["fail_from"]:
            raise RuntimeError("the accelerator caught fire")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    model.calls = calls
    yield model
    del model.calls


@pytest.mark.parametrize("fail_from", [1, 3], ids=["in-prefill", "mid-generation"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_failed_generation_is_a_500_in_openai_shape(failing_model, tok, path, fail_from):
    """A generation that fails answers 500 with type server_error naming the cause,
    never a 200 with finish_reason "stop"; the server keeps serving."""
    failing_model.calls["fail_from"] = fail_from
    body = {"messages": USER} if "chat" in path else {"prompt": "Hello"}
    body |= {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with served(failing_model, tok) as client:
        error = error_of(client.post(path, json=body), 500)
        assert error["type"] == "server_error" and "the accelerator caught fire" in error["message"]
        with pytest.raises(openai.InternalServerError) as raised:
            if "chat" in path:
                openai_client(client).chat.completions.create(model="m", messages=USER, max_tokens=6)
            else:
                openai_client(client).completions.create(model="m", prompt="Hello", max_tokens=6)
        assert raised.value.status_code == 500
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("fail_from", [1, 3], ids=["in-prefill", "mid-generation"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_failed_generation_streams_an_error_event(failing_model, tok, path, fail_from):
    """Streaming, the failure is an event in OpenAI's error shape (which the ``openai``
    package raises as an APIError); no choice finishes as if it had succeeded."""
    failing_model.calls["fail_from"] = fail_from
    body = {"messages": USER} if "chat" in path else {"prompt": "Hello"}
    body |= {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    with served(failing_model, tok) as client:
        response = client.post(path, json=body)
        assert response.status_code == 200  # the stream had started: the error comes as an event
        events = sse_events(response)
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and set(errors[0]) == {"error"} and set(errors[0]["error"]) == ERROR_KEYS
        assert errors[0]["error"]["type"] == "server_error"
        assert "the accelerator caught fire" in errors[0]["error"]["message"]
        reasons = [c.get("finish_reason") for e in events if isinstance(e, dict) for c in e.get("choices", [])]
        assert not any(reasons), reasons
        stream_kwargs = dict(model="m", max_tokens=6, stream=True)
        with pytest.raises(openai.APIError, match="caught fire"):
            if "chat" in path:
                list(openai_client(client).chat.completions.create(messages=USER, **stream_kwargs))
            else:
                list(openai_client(client).completions.create(prompt="Hello", **stream_kwargs))


# --------------------------------------------------------------------------- the catch-all 500


def test_unexpected_errors_are_a_500_in_openai_shape(model, tok, monkeypatch):
    """Any exception the handlers do not expect still answers OpenAI's shape, type
    server_error, with the exception named; the server stays up."""
    with served(model, tok) as client:
        engine = client.engine

        def broken():
            raise ZeroDivisionError("counters went missing")

        monkeypatch.setattr(engine, "stats", broken)
        error = error_of(client.get("/health"), 500)
        assert error == {
            "message": "internal error: ZeroDivisionError: counters went missing",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        monkeypatch.undo()
        import qwen.serving.app as app_module

        def no_prompt(*args, **kwargs):
            raise KeyError("prompt builder")

        monkeypatch.setattr(app_module, "make_context", no_prompt)
        error = error_of(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}), 500)
        assert error["type"] == "server_error" and "KeyError" in error["message"]
        with pytest.raises(openai.InternalServerError):
            openai_client(client).chat.completions.create(model="m", messages=USER, max_tokens=2)
        monkeypatch.undo()
        assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


# --------------------------------------------------------------------------- documented refusals


def _chat(**fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": USER, "max_tokens": 1, **fields}


def _completion(**fields) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": "Hello", "max_tokens": 1, **fields}


STOPS = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]


@pytest.mark.parametrize(
    "request_, param",
    [
        (_chat(response_format={"type": "yaml"}), "response_format.type"),
        (_completion(best_of=2), "best_of"),
        (_completion(n=2, best_of=3), "best_of"),
        (_completion(suffix="and then"), "suffix"),
        (_completion(stop=STOPS), "stop"),
        (_chat(stop=STOPS), "stop"),
        (_completion(prompt=""), "prompt"),
        (_completion(prompt=[]), "prompt"),
        (_completion(prompt=[""]), "prompt"),
        (_completion(prompt=["Hello", ""]), "prompt.1"),
        (_completion(prompt=[[]]), "prompt.0"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_documented_400s(model, tok, request_, param):
    """Options the server does not support, and empty prompts, are 400s naming the field."""
    path, body = request_
    with served(model, tok) as client:
        error = error_of(client.post(path, json=body), 400)
        assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize(
    "request_",
    [
        _chat(response_format={"type": "text"}),
        _chat(response_format={}),
        _completion(best_of=1),
        _completion(n=2, best_of=2),
        _completion(suffix=""),
        _completion(stop=STOPS[:MAX_STOP_STRINGS]),
        _chat(stop=STOPS[:MAX_STOP_STRINGS]),
        _completion(prompt=["Hello", "there"]),
    ],
)
def test_what_the_refusals_leave_allowed(model, tok, request_):
    """The edges of those refusals: text output, best_of equal to n, an empty suffix,
    exactly MAX_STOP_STRINGS stop strings, several non-empty prompts."""
    path, body = request_
    with served(model, tok) as client:
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == body.get("n", 1) * (
            len(body.get("prompt", "x")) if isinstance(body.get("prompt"), list) else 1
        )


def test_max_length_must_leave_room_for_a_completion(model, tok):
    """The legacy ``max_length`` (prompt + completion): equal to the prompt is a 400
    (context_length_exceeded); one more token allows exactly one."""
    prompt_tokens = len(make_context(tok, "hi", system=SYSTEM)[1])
    with served(model, tok) as client:
        for legacy in (prompt_tokens - 1, prompt_tokens):
            body = {"messages": USER, "max_length": legacy}
            error = error_of(client.post("/v1/chat/completions", json=body), 400)
            assert error["param"] == "max_length" and error["code"] == "context_length_exceeded"
            assert str(prompt_tokens) in error["message"]
        body = {"messages": USER, "max_length": prompt_tokens + 1, "ignore_eos": True}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 1,
            "total_tokens": prompt_tokens + 1,
        }
        assert reply["choices"][0]["finish_reason"] == "length"


def test_base_checkpoint_refuses_chat(tiny_dir):
    """A base (non-chat) checkpoint has no chat format: chat is a 400 pointing to
    /v1/completions, which works."""
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert getattr(base.generation_config, "chat_format", None) != "chatml"
    with served(base, AutoTokenizer.from_pretrained(tiny_dir)) as client:
        error = error_of(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}), 400)
        assert error["code"] == "not_a_chat_model" and error["param"] == "messages"
        assert "/v1/completions" in error["message"]
        with pytest.raises(openai.BadRequestError):
            openai_client(client).chat.completions.create(model="m", messages=USER, max_tokens=2)
        reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


# --------------------------------------------------------------------------- the test hook


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_forced_output_needs_enable_test_hooks(model, tok, path):
    """``forced_output`` makes the model say a given text: a testing aid that a server
    started without --enable-test-hooks refuses (400), so no client of a production
    server can inject the model's output; with the hook the text is what comes back."""
    body = {"messages": USER} if "chat" in path else {"prompt": "Hello"}
    body |= {"max_tokens": 8, "forced_output": "injected words"}
    with served(model, tok) as client:
        error = error_of(client.post(path, json=body), 400)
        assert error["param"] == "forced_output" and "--enable-test-hooks" in error["message"]
    with served(model, tok, enable_test_hooks=True) as client:
        reply = client.post(path, json=body)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert (choice["message"]["content"] if "chat" in path else choice["text"]) == "injected words"


# --------------------------------------------------------------------------- penalties over HTTP


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented formula, over the generated tokens only:
    ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            for token in set(input_ids[row, self.prompt_len :].tolist()):
                count = int((input_ids[row, self.prompt_len :] == token).sum())
                scores[row, token] -= count * self.frequency + self.presence
        return scores


# (-1, 1) and (-0.5, 0.3) let tokens repeat, where presence and frequency differ (a swap shows)
@pytest.mark.parametrize("presence, frequency", [(2.0, 0.0), (0.0, 1.5), (-1.0, 1.0), (-0.5, 0.3), (1.0, -1.0)])
def test_presence_and_frequency_penalties_over_http(model, tok, presence, frequency):
    """Greedy completions with OpenAI's penalties equal ``generate()`` with the formula
    written out here; the settings change the text (so dropping them cannot pass)."""
    prompt = tok.encode("The sea, the sea, the sea")
    n = 16

    def reference(processors) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            repetition_penalty=1.0,
            logits_processor=LogitsProcessorList(processors),
        )
        return out[0, len(prompt) :].tolist()

    expected = reference([OpenAIPenalties(len(prompt), presence, frequency)])
    assert expected != reference([]), "the penalties must change this greedy generation"
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}
    with served(model, tok) as client:
        reply = client.post(
            "/v1/completions", json=body | {"presence_penalty": presence, "frequency_penalty": frequency}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == tok.decode(expected, errors="replace")
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert plain != reply.json()["choices"][0]["text"]


# --------------------------------------------------------------------------- prefill groups


def test_max_prefill_tokens_groups_prefills(model, tok, monkeypatch):
    """Waiting prompts are prefilled together, in order, while (longest prompt) x
    (prompts) stays within max_prefill_tokens; a longer prompt is prefilled alone."""
    prefills = []
    forward = model.forward

    def spy(*args, **kwargs):
        if kwargs.get("position_ids") is None:  # the engine's decoding steps pass positions
            prefills.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    lengths = [10, 10, 10, 25, 5, 40, 3, 4, 8]
    # Worked out by hand for max_prefill_tokens=30: 3x10 = 30 fits; 25 + 5 would pad to
    # 2x25; 5 then 40 would be 2x40; 40 alone exceeds the limit but must run; 3, 4 and
    # 8 pad to 3x8 = 24.
    expected = [(3, 10), (1, 25), (1, 5), (1, 40), (3, 8)]
    engine = Engine(model, tok, max_batch_size=16, max_prefill_tokens=30).start()
    try:
        done = threading.Semaphore(0)
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        requests = [
            ([100 + i] * n, params, lambda update: update.finished and done.release(), f"r{i}")
            for i, n in enumerate(lengths)
        ]
        engine.submit_many(requests)
        for _ in lengths:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert prefills == expected


# --------------------------------------------------------------------------- command-line options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(tiny_chat_dir, tmp_path_factory):
    """openai_api.py as users start it, without --enable-test-hooks."""
    port = _free_port()
    log = tmp_path_factory.mktemp("cli-server") / "log.txt"
    cmd = [sys.executable, "openai_api.py", "-c", str(tiny_chat_dir), "--server-port", str(port), "--cpu-only"]
    cmd += ["--dtype", "fp32", "--max-model-len", "48", "--served-model-name", "my-qwen"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_served_model_name(cli_server):
    """--served-model-name is the model id listed and carried by every reply."""
    models = httpx.get(f"{cli_server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["my-qwen"]
    assert httpx.get(f"{cli_server}/v1/models/my-qwen").status_code == 200
    assert error_of(httpx.get(f"{cli_server}/v1/models/tiny-chat"), 404)["code"] == "model_not_found"
    client = openai.OpenAI(base_url=f"{cli_server}/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model="anything", messages=USER, max_tokens=1).model == "my-qwen"
    assert client.completions.create(model="anything", prompt="Hello", max_tokens=1).model == "my-qwen"
    chunks = list(client.chat.completions.create(model="anything", messages=USER, max_tokens=1, stream=True))
    assert chunks and {c.model for c in chunks} == {"my-qwen"}


def test_max_model_len(cli_server, tok):
    """--max-model-len bounds prompt + completion: one token over is a 400 with the
    limit; without max_tokens the completion fills exactly the room left."""
    prompt_tokens = len(make_context(tok, "hi", system=SYSTEM)[1])
    room = 48 - prompt_tokens
    assert room > 1
    assert httpx.get(f"{cli_server}/v1/models").json()["data"][0]["max_model_len"] == 48
    chat = f"{cli_server}/v1/chat/completions"
    error = error_of(httpx.post(chat, json={"messages": USER, "max_tokens": room + 1}), 400)
    assert error["code"] == "context_length_exceeded" and "48" in error["message"]
    fits = httpx.post(chat, json={"messages": USER, "max_tokens": room, "ignore_eos": True}, timeout=60).json()
    assert fits["usage"]["total_tokens"] == 48
    filled = httpx.post(chat, json={"messages": USER, "ignore_eos": True}, timeout=60).json()
    assert filled["usage"]["completion_tokens"] == room
    error = error_of(httpx.post(f"{cli_server}/v1/completions", json={"prompt": list(range(100, 149))}), 400)
    assert error["code"] == "context_length_exceeded"


def test_cli_server_refuses_forced_output(cli_server):
    """Started without --enable-test-hooks, the real server refuses the test hook."""
    body = {"messages": USER, "max_tokens": 4, "forced_output": "you have been hacked"}
    error = error_of(httpx.post(f"{cli_server}/v1/chat/completions", json=body), 400)
    assert error["param"] == "forced_output"
    body = {"prompt": "Hello", "max_tokens": 4, "forced_output": "you have been hacked"}
    assert error_of(httpx.post(f"{cli_server}/v1/completions", json=body), 400)["param"] == "forced_output"
