"""The OpenAI-compatible server (openai_api.py, qwen.serving).

End to end: the real server runs in a subprocess on loopback with a tiny random chat
checkpoint (fp32 on CPU) and is driven with the official ``openai`` package (and raw
``httpx`` where the request must be malformed). Greedy results are checked against
``model.generate``/``model.chat`` run in this process, and concurrent results against
the same requests sent alone.

What is and is not end to end for function calling: a random model never writes
ReAct text, so the parser and the prompt builder are unit-tested directly, and the
end-to-end tool tests use the server's test hook ``forced_output`` (enabled by the
hidden flag ``--enable-test-hooks``): the model runs and every step of the server runs
(prompt building, batching, stop at ``Observation:``, streaming, parsing), but the
sampled tokens are replaced by the tokens of a given text.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import REPO, make_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Auto classes)
from qwen.qwen_generation_utils import make_context
from qwen.serving.engine import (
    Engine,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    RowSampler,
    SamplingParams,
    TextTracker,
)
from qwen.serving.function_call import (
    PromptError,
    ReactStream,
    build_chat_prompt,
    parse_react,
    react_instruction,
    select_functions,
)

SYSTEM = "You are a helpful assistant."
IM_END = 151645
WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]
CALL_TEXT = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # fp32: responses are compared with a float32 model run in the test process
        cmd = [sys.executable, "openai_api.py", "-c", str(checkpoint), "--server-port", str(self.port), "--cpu-only"]
        cmd += ["--dtype", "fp32"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*cmd, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_idle(self, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["active"] == 0 and health["waiting"] == 0:
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout} s: {health}")
            time.sleep(0.05)

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    srv = Server(tiny_chat_dir, tmp_path_factory.mktemp("server") / "log.txt", "--enable-test-hooks")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def busy_server(tiny_chat_dir, tmp_path_factory):
    """One batch slot, one queue slot, and credentials required."""
    srv = Server(
        tiny_chat_dir,
        tmp_path_factory.mktemp("busy") / "log.txt",
        "--max-batch-size=1",
        "--max-queue=1",
        "--api-key=sk-test",
        "--api-auth=alice:secret",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="module")
def model(tiny_chat_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()


def _reference(model, prompt_ids: list[int], max_new_tokens: int, stop_ids=(151643, 151644, 151645)):
    """Greedy generation alone, cut after the first stop token: (generated ids, text ids)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        stop_words_ids=[[t] for t in stop_ids],
    )[0, len(prompt_ids) :].tolist()
    text = out[:-1] if out and out[-1] in stop_ids else out
    return out, text


# --------------------------------------------------------------------------- basics


def test_models_health_docs(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    health = server.health()
    assert health["status"] == "ok" and health["max_batch_size"] == 16 and health["max_model_len"] == 8192
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(paths)


def test_chat_greedy_equals_model_chat(client, model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(model="anything", messages=messages, max_tokens=12, **GREEDY)
    expected, _ = model.chat(tok, "Name three colours.", system="Be brief.", do_sample=False, max_new_tokens=12,
                             repetition_penalty=1.0)  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert reply.model == "tiny-chat" and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    # usage: the tokenizer's counts of the one ChatML prompt builder and of the generated ids
    _, prompt = make_context(tok, "Name three colours.", system="Be brief.", max_window_size=None)
    generated, _ = _reference(model, prompt, 12)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(generated)
    assert reply.usage.total_tokens == len(prompt) + len(generated)
    assert choice.finish_reason == ("stop" if generated[-1] == IM_END else "length")


def test_chat_history_and_default_sampling(client, model, tok):
    """A multi-turn conversation, and the checkpoint's sampling defaults (repetition_penalty 1.1)."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    expected, _ = model.chat(tok, "And now?", history=[("Hi", "Hello!")], do_sample=False, max_new_tokens=10)
    assert reply.choices[0].message.content == expected
    _, prompt = make_context(tok, "And now?", history=[("Hi", "Hello!")], system=SYSTEM, max_window_size=None)
    assert reply.usage.prompt_tokens == len(prompt)


def test_assistant_prefill_and_max_length(client, model, tok):
    """A conversation ending with an assistant message: the model continues that message."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here"}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8, **GREEDY)
    _, prompt = make_context(tok, "Hi", system=SYSTEM, max_window_size=None)
    prompt += tok.encode("Sure, here", allowed_special=set())
    generated, text_ids = _reference(model, prompt, 8)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(generated)
    assert reply.choices[0].message.content == tok.decode(text_ids).strip()
    # the original server's max_length: prompt + completion
    legacy = client.chat.completions.create(
        model="m", messages=messages, temperature=0, extra_body={"max_length": len(prompt) + 3}
    )
    assert legacy.usage.completion_tokens == 3 and legacy.choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"


def test_stop_strings(client):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Count to ten."}], max_tokens=40, **GREEDY)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    # a stop string from the middle of the greedy answer, without surrounding spaces
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-2:]
    expected = text[: text.find(stop)].strip()
    reply = client.chat.completions.create(stop=[stop, "never-appears"], **kwargs)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 40
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kwargs))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == expected and stop not in "".join(deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions(client, model, tok):
    prompt = "The quick brown fox"
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=10, **GREEDY)
    ids = tok.encode(prompt)
    generated, text_ids = _reference(model, ids, 10)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == tok.decode(text_ids)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(generated)
    # token-id prompts, echo, several prompts with n=2
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=10, echo=True, **GREEDY)
    assert by_ids.choices[0].text == prompt + reply.choices[0].text
    many = client.completions.create(model="m", prompt=[prompt, "Hello"], max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices alike
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("Hello"))
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=10, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_completions_defaults_and_chat_only_fields(server):
    """``max_tokens`` left out or null is OpenAI's 16; the chat-only length fields are
    unknown extras on /v1/completions (ignored, never read unvalidated);
    ``logprobs: 0`` asks for the chosen tokens' logprobs (and no alternatives)."""
    url = f"{server.url}/v1/completions"
    base = {"prompt": "hello", "temperature": 0, "ignore_eos": True}
    for extra in ({}, {"max_tokens": None}, {"max_completion_tokens": "abc"}, {"max_tokens": None, "max_length": "x"}):
        response = httpx.post(url, json={**base, **extra}, timeout=60)
        assert response.status_code == 200, (extra, response.text)
        assert response.json()["usage"]["completion_tokens"] == 16, extra
    response = httpx.post(url, json={**base, "max_completion_tokens": 3}, timeout=60)
    assert response.json()["usage"]["completion_tokens"] == 16
    scores = httpx.post(url, json={**base, "logprobs": 0}, timeout=60).json()["choices"][0]["logprobs"]
    assert len(scores["token_logprobs"]) == 16 and all(len(top) == 1 for top in scores["top_logprobs"])
    assert httpx.post(url, json={**base, "suffix": "", "max_tokens": 2}, timeout=60).status_code == 200


def test_n_and_seed(client):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2, seed=7)
    first = client.chat.completions.create(temperature=1.0, **kwargs)
    again = client.chat.completions.create(temperature=1.0, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # choices get their own seeds
    assert first.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(temperature=1.0, stream=True, **kwargs))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
        assert text == first.choices[index].message.content


# --------------------------------------------------------------------------- function calling (unit)


def test_react_instruction_format():
    text = react_instruction([WEATHER])
    assert text.startswith("Answer the following questions as best you can. You have access to the following APIs:")
    assert (
        "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
        "Current weather of a city. Parameters: " + json.dumps(WEATHER["parameters"]) in text
    )
    assert "Action: the action to take, should be one of [get_weather]" in text
    assert text.endswith("Final Answer: the final answer to the original input question\n\nBegin!")


def test_select_functions():
    assert select_functions(TOOLS) == ([WEATHER], "tools")
    assert select_functions(TOOLS, "none") == ([], "tools")
    other = {"name": "other"}
    named = {"type": "function", "function": {"name": "other"}}
    assert select_functions([*TOOLS, {"type": "function", "function": other}], named) == ([other], "tools")
    assert select_functions(functions=[WEATHER], function_call={"name": "get_weather"}) == ([WEATHER], "functions")
    assert select_functions() == ([], None)
    with pytest.raises(PromptError, match="not among"):
        select_functions(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(PromptError) as err:
        select_functions([{"type": "retrieval"}])
    assert err.value.param == "tools.0.type"


def test_build_chat_prompt_plain():
    prompt = build_chat_prompt(
        [
            {"role": "system", "content": "A"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "r1"},
            {"role": "developer", "content": "B"},
            {"role": "user", "content": [{"type": "text", "text": "q2"}]},
            {"role": "user", "content": "more"},
        ]
    )
    assert (prompt.system, prompt.history, prompt.query, prompt.prefill) == ("A\n\nB", [("q1", "r1")], "q2\n\nmore", "")
    default = build_chat_prompt([{"role": "user", "content": "hi"}])
    assert default.system == SYSTEM
    prefill = build_chat_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}])
    assert (prefill.query, prefill.prefill, prefill.history) == ("hi", "Sure, ", [])


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "system", "content": "s"}], "messages"),
        ([{"role": "bot", "content": "x"}], "messages.0.role"),
        ([{"role": "assistant", "content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "messages.1.role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages.0.content.0"),
    ],
)
def test_build_chat_prompt_errors(messages, param):
    with pytest.raises(PromptError) as err:
        build_chat_prompt(messages)
    assert err.value.param == param


def test_build_chat_prompt_tool_round_trip():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "I need the weather.",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    prompt = build_chat_prompt(messages, [WEATHER])
    assert prompt.query == react_instruction([WEATHER]) + "\n\nQuestion: Weather in Paris?"
    assert prompt.prefill == CALL_TEXT + "\nThought:"
    assert prompt.history == []
    # the finished exchange, as history of a new question
    final = {"role": "assistant", "content": "It is sunny."}
    later = build_chat_prompt([*messages, final, {"role": "user", "content": "Thanks"}], [WEATHER])
    assert later.history == [
        ("Weather in Paris?", CALL_TEXT + "\nThought: I now know the final answer\nFinal Answer: It is sunny.")
    ]
    assert later.query.endswith("\n\nQuestion: Thanks")
    legacy = build_chat_prompt(
        [
            messages[0],
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "ok"},
        ],
        [{"name": "f"}],
    )
    assert legacy.prefill == "Thought: \nAction: f\nAction Input: {}\nObservation: ok\nThought:"
    # several tool calls in one assistant message: consecutive actions, each with its result
    calls = [{"function": {"name": "f", "arguments": {"i": i}}} for i in (1, 2)]
    parallel = build_chat_prompt(
        [
            messages[0],
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
        ],
        [{"name": "f"}],
    )
    assert parallel.prefill == (
        'Thought: \nAction: f\nAction Input: {"i": 1}\nObservation: r1\n'
        'Action: f\nAction Input: {"i": 2}\nObservation: r2\nThought:'
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (CALL_TEXT, ("I need the weather.", "get_weather", '{"city": "Paris"}')),
        ("Action: get_weather\nAction Input: {}", (None, "get_weather", "{}")),
        ('Thought: x\nAction: get_weather\nAction Input: ```json\n{"city": "Rome"}\n```', ("x", "get_weather", '{"city": "Rome"}')),
        ("Thought: I now know the final answer\nFinal Answer: Sunny.", ("Sunny.", None, None)),
        ("Final Answer: A\nAction: get_weather\nAction Input: {}", ("A\nAction: get_weather\nAction Input: {}", None, None)),
        ("just text", ("just text", None, None)),
        ("Thought: no Action: here\nFinal Answer: ok", ("ok", None, None)),  # markers start a line
        # malformed calls degrade to the whole text as content
        ("Thought: x\nAction: nope\nAction Input: {}", ("Thought: x\nAction: nope\nAction Input: {}", None, None)),
        ("Thought: x\nAction: get_weather\nAction Input: {oops", ("Thought: x\nAction: get_weather\nAction Input: {oops", None, None)),
        ("Thought: x\nAction: get_weather", ("Thought: x\nAction: get_weather", None, None)),
        ('Action: get_weather\nAction Input: ["a"]', ('Action: get_weather\nAction Input: ["a"]', None, None)),
    ],
)  # fmt: skip
def test_parse_react(text, expected):
    reply = parse_react(text, {"get_weather"})
    assert (reply.content, reply.name, reply.arguments) == expected


def test_react_stream_matches_parse():
    for text in ("Thought: fine\nFinal Answer: It is sunny today.  ", CALL_TEXT, "no format at all", "Final Answer:"):
        stream = ReactStream({"get_weather"})
        shown = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
        rest, reply = stream.finish()
        assert reply == parse_react(text, {"get_weather"})
        if not reply.is_call:
            assert shown + rest == reply.content
    # a "final answer" after an action is part of the call, never streamed
    text = "Thought: x\nAction: get_weather\nAction Input: {}\nFinal Answer: y"
    stream = ReactStream({"get_weather"})
    shown = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, reply = stream.finish()
    assert reply.is_call and shown == "" and rest == reply.content == "x"  # the thought, sent with the call
    stream = ReactStream(None)
    assert stream.feed("Thought: a\nFinal Answer: Hel") == "Hel"  # a final answer streams before the end


# --------------------------------------------------------------------------- function calling (end to end)


def test_tool_call_round_trip(client, tok):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(
        model="m", messages=question, tools=TOOLS, extra_body={"forced_output": CALL_TEXT + " in Paris"}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "I need the weather."
    # generation stopped at "Observation:" (never emitted), counted up to there
    until = CALL_TEXT[: CALL_TEXT.index("Observation:") + len("Observation:")]
    assert reply.usage.completion_tokens == len(tok.encode(until))

    followup = [
        *question,
        {"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answer = client.chat.completions.create(
        model="m",
        messages=followup,
        tools=TOOLS,
        extra_body={"forced_output": " I now know the final answer\nFinal Answer: It is sunny in Paris."},
    )
    assert answer.choices[0].message.content == "It is sunny in Paris."
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    # the prompt: the ReAct question, and the model continuing after the observation
    query = react_instruction([WEATHER]) + "\n\nQuestion: Weather in Paris?"
    _, ids = make_context(tok, query, system=SYSTEM, max_window_size=None)
    prefill = tok.encode(CALL_TEXT + "\nThought:", allowed_special=set())
    assert answer.usage.prompt_tokens == len(ids) + len(prefill)


def test_tool_call_streaming(client):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    chunks = list(
        client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, stream=True, extra_body={"forced_output": CALL_TEXT}
        )
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "I need the weather."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    final = "Thought: I now know the final answer\nFinal Answer: It is sunny, 21 degrees."
    chunks = list(
        client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, stream=True, extra_body={"forced_output": final}
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "It is sunny, 21 degrees." and len(pieces) > 1  # streamed as it came
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_legacy_functions_and_malformed_output(client):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(
        model="m", messages=question, functions=[WEATHER], extra_body={"forced_output": CALL_TEXT}
    )
    assert reply.choices[0].finish_reason == "function_call"
    assert reply.choices[0].message.function_call.name == "get_weather"
    assert json.loads(reply.choices[0].message.function_call.arguments) == {"city": "Paris"}
    broken = "Thought: hmm\nAction: get_weather\nAction Input: {city: Paris"
    for stream in (False, True):
        result = client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, stream=stream, extra_body={"forced_output": broken}
        )
        if stream:
            chunks = list(result)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == broken
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert result.choices[0].message.content == broken and result.choices[0].finish_reason == "stop"
            assert not result.choices[0].message.tool_calls


def test_tool_choice_none_is_plain_chat(client, tok):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="m", messages=question, tools=TOOLS, tool_choice="none", max_tokens=2)
    _, ids = make_context(tok, "Weather in Paris?", system=SYSTEM, max_window_size=None)
    assert reply.usage.prompt_tokens == len(ids)
    # a reply that looks like a call is text, not a call (of a tool or of anything else)
    for forced in (CALL_TEXT, 'Thought: x\nAction: rm_rf\nAction Input: {"path": "/"}'):
        for kwargs in ({"tools": TOOLS, "tool_choice": "none"}, {"functions": [WEATHER], "function_call": "none"}):
            reply = client.chat.completions.create(
                model="m", messages=question, extra_body={"forced_output": forced}, **kwargs
            )
            message = reply.choices[0].message
            assert not message.tool_calls and not message.function_call
            assert message.content == forced and reply.choices[0].finish_reason == "stop"
    # and streams as it is generated, as without tools
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=question,
            tools=TOOLS,
            tool_choice="none",
            stream=True,
            extra_body={"forced_output": "one two three four five"},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "one two three four five" and len(pieces) > 1


def test_continued_final_answer_streams(client):
    """A conversation ending with an assistant message, with tools: the model continues
    that message's final answer, which streams as it is generated (the markers are in
    the prompt, not in the generated text) and equals the non-streamed reply."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "It is"},
    ]
    forced = " sunny and warm in Paris today"
    for kwargs in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"}, {}):
        whole = client.chat.completions.create(
            model="m", messages=messages, extra_body={"forced_output": forced}, **kwargs
        )
        assert whole.choices[0].message.content == forced.strip() and not whole.choices[0].message.tool_calls
        chunks = list(
            client.chat.completions.create(
                model="m", messages=messages, stream=True, extra_body={"forced_output": forced}, **kwargs
            )
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert "".join(pieces) == forced.strip() and len(pieces) > 1, kwargs
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_calls_carry_the_declared_name_not_name_for_model(client):
    """The original ``name_for_model`` is what the model is told and writes after
    ``Action:``; the reply names the function as the client declared it."""
    question = [{"role": "user", "content": "Weather in Paris?"}]
    aliased = {**WEATHER, "name_for_model": "weather_api"}
    forced = CALL_TEXT.replace("Action: get_weather", "Action: weather_api")
    for stream in (False, True):
        for kwargs in ({"tools": [{"type": "function", "function": aliased}]}, {"functions": [aliased]}):
            result = client.chat.completions.create(
                model="m", messages=question, stream=stream, extra_body={"forced_output": forced}, **kwargs
            )
            if stream:
                deltas = [c.choices[0].delta for c in result]
                names = [tc.function.name for d in deltas for tc in (d.tool_calls or []) if tc.function.name]
                names += [d.function_call.name for d in deltas if d.function_call and d.function_call.name]
            else:
                message = result.choices[0].message
                names = [tc.function.name for tc in message.tool_calls or []]
                names += [message.function_call.name] if message.function_call else []
            assert names == ["get_weather"], (stream, kwargs, names)


# --------------------------------------------------------------------------- errors


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "body, param, words",
    [
        ('{"messages": [', None, "parse the JSON"),
        ("{}", "messages", "messages"),
        ({"messages": "hi"}, "messages", "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", "number"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature", "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 100}, "n", "n"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"messages": []}, "messages", "at least one"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role", "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice", "no tools"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": TOOLS,
                "tool_choice": {"function": "get_weather"},
            },
            "tool_choice",
            "name a function",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f", "name_for_model": 5}]},
            "functions.0.name_for_model",
            "must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages.0.content.0.text",
            "must be a string",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": TOOLS,
                "tool_choice": "required",
                "max_tokens": 2,
            },
            None,
            None,
        ),
    ],
)
def test_invalid_requests(server, body, param, words):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, **kwargs)
    if words is None:  # accepted: "required" cannot be enforced but is not an error
        assert response.status_code == 200
        return
    error = _error(response, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]


def test_context_length_and_other_errors(server, client, tok):
    messages = [{"role": "user", "content": "x"}]
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 9000})
    error = _error(response, 400)
    assert error["code"] == "context_length_exceeded"
    prompt_tokens = len(make_context(tok, "x", system=SYSTEM)[1])
    assert (
        f"requested {prompt_tokens + 9000} tokens ({prompt_tokens} in the messages/prompt, 9000 in the completion)"
        in error["message"]
    )
    assert "maximum context length is 8192 tokens" in error["message"]
    long_prompt = list(range(100, 8300))
    error = _error(httpx.post(f"{server.url}/v1/completions", json={"prompt": long_prompt}), 400)
    assert error["code"] == "context_length_exceeded" and "8200" in error["message"]
    error = _error(httpx.post(f"{server.url}/v1/completions", json={"prompt": [10**7]}), 400)
    assert error["param"] == "prompt"
    assert _error(httpx.get(f"{server.url}/v1/nothing"), 404)["code"] == "not_found"
    assert _error(httpx.get(f"{server.url}/v1/models/gpt-4"), 404)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=messages, max_tokens=9000)
    assert err.value.code == "context_length_exceeded"
    assert server.health()["status"] == "ok"


def test_auth(busy_server):
    url = f"{busy_server.url}/v1/models"
    assert _error(httpx.get(url), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test"}).status_code == 200
    assert httpx.get(url, auth=("alice", "secret")).status_code == 200
    assert _error(httpx.get(url, auth=("alice", "wrong")), 401)["type"] == "invalid_request_error"
    assert httpx.get(f"{busy_server.url}/health").status_code == 200
    # credentials are checked before the body is read: malformed JSON without them is a 401
    chat = f"{busy_server.url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    assert _error(httpx.post(chat, content="{bad", headers=headers), 401)["code"] == "invalid_api_key"
    with_key = headers | {"Authorization": "Bearer sk-test"}
    assert _error(httpx.post(chat, content="{bad", headers=with_key), 400)["code"] == "invalid_json"
    with pytest.raises(openai.AuthenticationError):
        busy_server.client(api_key="wrong").models.list()
    assert busy_server.client(api_key="sk-test").models.list().data[0].id == "tiny-chat"


def test_queue_full_gives_429(busy_server):
    client = busy_server.client(api_key="sk-test")
    long = dict(
        model="m", messages=[{"role": "user", "content": "go"}], max_tokens=8000, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(stream=True, **long)
    chunks = iter(stream)
    next(chunks), next(chunks)  # generating: the one batch slot is taken

    def wait_for(key, value):
        deadline = time.monotonic() + 10
        while busy_server.health()[key] != value:
            assert time.monotonic() < deadline, busy_server.health()
            time.sleep(0.05)

    wait_for("active", 1)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.chat.completions.create, model="m", messages=long["messages"], max_tokens=2)
        wait_for("waiting", 1)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="m", messages=long["messages"], max_tokens=2)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "rate_limit_exceeded"
        stream.close()  # frees the slot: the queued request runs
        assert queued.result(timeout=60).usage.completion_tokens == 2
    busy_server.wait_idle()


# --------------------------------------------------------------------------- batching


def test_concurrent_streams_equal_alone(server, client):
    prompts = [f"Question number {i}: {'why ' * i}is the sky blue?" for i in range(8)]
    lengths = [12, 30, 20, 8, 25, 16, 30, 10]

    def run(i: int, stream: bool, delay: float = 0.0) -> str:
        time.sleep(delay)
        kwargs = dict(model="m", messages=[{"role": "user", "content": prompts[i]}], max_tokens=lengths[i], **GREEDY)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))

    alone = [run(i, stream=False) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: run(i, True, 0.02 * i), range(8)))
    assert together == alone
    health = server.wait_idle()
    assert health["peak_active"] >= 4  # they did share the batch


def test_disconnect_frees_slot(server, client):
    long = dict(
        model="m", messages=[{"role": "user", "content": "go"}], max_tokens=8000, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(stream=True, **long)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert server.health()["active"] == 1
    stream.close()
    server.wait_idle(timeout=10)
    # a non-streaming client that gives up
    with pytest.raises(httpx.ReadTimeout):
        body = {"messages": long["messages"], "max_tokens": 8000, "ignore_eos": True}
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.0)
    server.wait_idle(timeout=10)
    # the engine still serves
    reply = client.chat.completions.create(model="m", messages=long["messages"], max_tokens=3)
    assert reply.usage.completion_tokens == 3


# --------------------------------------------------------------------------- engine (in process)


def test_engine_batched_equals_generate_beyond_seq_length(tiny_dir):
    """Rows of different lengths (several beyond seq_length=64, so dynamic NTK and logN
    are active) joining and leaving a batch of 3: each equals generate() alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    lengths, news = (5, 70, 12, 100, 66), (30, 20, 40, 25, 15)
    prompts = [torch.randint(0, 150000, (n,), generator=generator).tolist() for n in lengths]
    expected = []
    for prompt, new in zip(prompts, news, strict=True):
        ids = torch.tensor([prompt])
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, repetition_penalty=1.0)  # fmt: skip
        expected.append(out[0, len(prompt) :].tolist())
    engine = Engine(base, tokenizer, max_batch_size=3, max_model_len=256).start()
    try:
        results = [None] * len(prompts)

        def run(i):
            time.sleep(0.01 * i)
            params = SamplingParams(max_tokens=news[i], temperature=0, ignore_eos=True)
            results[i] = engine.generate(prompts[i], params, timeout=120).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == expected
        assert engine.peak_active == 3
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.7, 0, 0.8), (1.0, 50, 0.9), (1.3, 0, 0.99), (0.5, 2000, 0.95)]
)
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_sampler_distribution_equals_transformers_warpers(temperature, top_k, top_p, scale):
    """The engine's partial-sort nucleus sampling keeps the same tokens with the same
    probabilities as transformers' Temperature/TopK/TopP warpers."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(1, 151936, generator=torch.Generator().manual_seed(3)) * scale
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    indices, probs = RowSampler(params, 0, torch.device("cpu")).distribution(scores)
    mine = torch.zeros(151936)
    mine[indices] = probs / probs.sum()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    if top_k:
        warpers.insert(1, TopKLogitsWarper(top_k))
    reference = torch.softmax(warpers(None, scores.clone())[0], dim=-1)
    # the same nucleus, up to rounding at its edge (the cumulative sums run in opposite orders)
    differ = (mine > 0) != (reference > 0)
    assert int(differ.sum()) <= 2 and float(reference[differ].sum() + mine[differ].sum()) < 1e-4
    torch.testing.assert_close(mine[~differ], reference[~differ], atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("temperature, repetition_penalty", [(1e-40, 1.0), (1e-30, 1.3), (0.7, 1e-300), (1.0, 1e-300)])
def test_sampler_survives_overflowing_settings(temperature, repetition_penalty):
    """Settings the API accepts but that overflow float32 (scores / 1e-40 = inf) give
    the limit distribution, never NaN: a tiny temperature draws the best token."""
    scores = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1)) * 3
    scores[0, 7] = 12.0  # the best token, and a seen one
    ids = [7, 3, 3]
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty, seed=0)
    sampler = RowSampler(params, 0, torch.device("cpu"))
    processed = sampler.processors(torch.tensor([ids]), scores.clone()) if sampler.processors else scores
    indices, probs = sampler.distribution(processed)
    assert bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0
    best = int(processed.argmax())
    tokens = {sampler(ids, scores.clone()) for _ in range(20)}
    if temperature < 1e-20:
        assert tokens == {best}
    else:  # the penalty made every seen token's positive score infinite: those share the mass
        assert tokens <= {i for i in ids if processed[0, i] == float("inf")} | {best}


def test_penalties_equal_reference():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[1, 5, 5, 9, 100, 5]])
    scores = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(RepetitionPenalty(1.3)(ids, scores), RepetitionPenaltyLogitsProcessor(1.3)(ids, scores))
    out = PresenceFrequencyPenalty(0.5, 0.25, prompt_len=2)(ids, scores)  # generated: 5, 9, 100, 5
    expected = scores.clone()
    expected[0, 5] -= 0.5 + 0.25 * 2
    expected[0, [9, 100]] -= 0.5 + 0.25
    torch.testing.assert_close(out, expected)


def test_seeded_sampling_is_batch_independent(tiny_chat_dir, tok, model):
    engine = Engine(model, tok, max_batch_size=4).start()
    try:
        # A low temperature: a random model's distribution is nearly flat over the whole
        # vocabulary, where batched/single rounding differences (1e-6) could move a draw.
        params = [SamplingParams(max_tokens=12, temperature=0.2, top_p=0.9, seed=s, ignore_eos=True) for s in range(4)]
        prompts = [tok.encode(f"prompt {i}") for i in range(4)]
        alone = [engine.generate(p, params[i]).token_ids for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: engine.generate(prompts[i], params[i]).token_ids, range(4)))
        assert together == alone
    finally:
        engine.stop()


def test_text_tracker_stop_strings_and_partial_characters():
    pieces = {1: "Hel", 2: "lo wo", 3: "rld", 4: "!", 5: b"\xe4".decode("latin-1")}
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), stop=["o world"])
    assert tracker.push(1) == ("Hel", False)
    assert tracker.push(2) == ("l", False)  # "lo wo" may start the stop string: held back
    assert tracker.push(3) == ("", True) and tracker.text == "Hell"
    # of several stop strings, the one that starts first cuts the text
    tracker = TextTracker(lambda ids: "Hello world", stop=["world", "lo"])
    assert tracker.push(1) == ("Hel", True)
    # trailing U+FFFD (a character still incomplete) is held back until the end
    utf8 = bytes([0xE4, 0xBD, 0xA0])  # 你

    def decode(ids):
        return b"".join({1: b"a", 2: utf8[:2], 3: utf8[2:]}[i] for i in ids).decode("utf-8", errors="replace")

    tracker = TextTracker(decode, strip=True)
    assert [tracker.push(1), tracker.push(2), tracker.push(3)] == [("a", False), ("", False), ("你", False)]
    tracker = TextTracker(lambda ids: " x " * len(ids), strip=True)
    assert tracker.push(1) == ("x", False) and tracker.push(2) == ("  x", False) and tracker.flush() == ""


def test_auto_dtype_is_the_stored_one(tmp_path):
    """--dtype auto on CPU loads what the checkpoint stores: its precision flag, else its
    config's dtype, else its safetensors tensors' dtype (float32 when nothing says half)."""
    from qwen.loading import stored_dtype as _stored_dtype

    for stored, expected in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        ckpt = make_tiny(tmp_path / stored, "--dtype", stored, "--layers", "1")
        assert _stored_dtype(str(ckpt)) == expected
    flagged = tmp_path / "bf16"
    config = json.loads((flagged / "config.json").read_text())
    (flagged / "config.json").write_text(json.dumps({**config, "fp16": True}))
    assert _stored_dtype(str(flagged)) == torch.float16


def test_server_packs_weights_for_batches_where_bf16_is_native(tmp_path, monkeypatch):
    """load_engine gives a bf16 CPU model packed weight copies for batched steps
    (pack_for_cpu_batches with the batch size; --no-pack-weights to skip), never for
    max_batch_size 1 or float32 weights. Where bf16 matmuls are native the packed copies
    give the plain product's values and a replaced weight drops its copy; elsewhere (oneDNN
    cannot pack bf16 without AVX-512 or AVX-NE-CONVERT) packing does nothing."""
    from qwen import cpu_engine
    from qwen.serving.app import load_engine

    ckpt = str(make_tiny(tmp_path / "bf16", "--dtype", "bf16", "--layers", "1"))
    calls = []
    real_pack = cpu_engine.pack_for_cpu_batches
    monkeypatch.setattr(cpu_engine, "pack_for_cpu_batches", lambda model, rows: calls.append(rows) or 0)
    for kwargs, expected in [
        ({"max_batch_size": 4}, [4]),
        ({"max_batch_size": 4, "pack_weights": False}, []),
        ({"max_batch_size": 1}, []),
    ]:
        calls.clear()
        load_engine(ckpt, cpu_only=True, **kwargs)
        assert calls == expected, kwargs

    with monkeypatch.context() as m:  # float32 weights are never packed, even where bf16 is native
        m.setattr(cpu_engine, "cpu_has_native", lambda dtype: True)
        fp32 = load_engine(ckpt, cpu_only=True, max_batch_size=1, dtype="fp32").model
        assert real_pack(fp32, 4) == 0
    model = load_engine(ckpt, cpu_only=True, max_batch_size=1).model
    linears = [m for m in model.modules() if isinstance(m, cpu_engine.CPULinear)]
    added = real_pack(model, 4)
    if not cpu_engine.cpu_has_native(torch.bfloat16):
        assert added == 0 and all(m._packed is None for m in linears)
        return
    assert added == sum(m.weight.numel() * 2 for m in linears)
    with torch.no_grad():
        for m in linears:  # a batched no-grad product reads the packed copy: same values
            assert m._packed is not None and m._packed_rows == 4
            x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
            reference = (x.float() @ m.weight.float().T + (0 if m.bias is None else m.bias.float())).bfloat16()
            torch.testing.assert_close(m(x), reference, atol=0.02, rtol=0.02)
            m.weight.data = m.weight.data.clone()  # a replaced weight drops its stale copy
            m(x)
            assert m._packed is None


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--api-key", ""], "--api-key is empty"),
        (["--api-key", "  "], "--api-key is empty"),
        (["--api-auth", "alice"], "--api-auth must be USER:PASSWORD"),
        (["--api-auth", "alice:"], "--api-auth must be USER:PASSWORD"),
        (["--api-auth", ":secret"], "--api-auth must be USER:PASSWORD"),
    ],
)
def test_empty_credentials_are_refused(flags, words):
    """An empty key (say an unset $KEY in a launch script) must not quietly serve
    without authentication: an argparse error before loading."""
    cmd = [sys.executable, "openai_api.py", "-c", "/nonexistent", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags", [["--max-batch-size", "0"], ["--max-queue", "-1"], ["--max-prefill-tokens", "0"], ["--threads", "-2"]]
)
def test_bad_limits_fail_before_loading(flags):
    """Out-of-range limits are argparse errors naming the flag (exit 2, nothing loaded:
    the checkpoint path does not even exist)."""
    cmd = [sys.executable, "openai_api.py", "-c", "/nonexistent", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert f"{flags[0]} must be at least" in result.stderr and "Traceback" not in result.stderr


def test_ignore_eos_and_stopped_engine(tiny_chat_dir, model, tok):
    """``ignore_eos`` runs past the end token to ``max_tokens``; without it the end token
    stops the row. A request to a server whose engine is not running is a 503 in
    OpenAI's shape, and the server keeps answering."""
    from fastapi.testclient import TestClient

    from qwen.serving.app import create_app

    engine = Engine(model, tok, max_batch_size=2).start()
    try:
        ids = tok.encode("Hello")
        forced = dict(max_tokens=5, forced_token_ids=tok.encode("hi"), stop_token_ids=[IM_END], temperature=0)
        stopped = engine.generate(ids, SamplingParams(**forced))
        assert stopped.finish_reason == "stop" and stopped.completion_tokens == len(tok.encode("hi")) + 1
        ignoring = engine.generate(ids, SamplingParams(**forced, ignore_eos=True))
        assert ignoring.finish_reason == "length" and ignoring.completion_tokens == 5
    finally:
        engine.stop()
    client = TestClient(create_app(engine))  # no lifespan: the engine stays stopped
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(2):
        error = _error(client.post("/v1/chat/completions", json=body), 503)
        assert error["code"] == "engine_stopped" and error["type"] == "server_error"
    assert client.get("/health").status_code == 503


def test_checkpoint_without_sampling_defaults_to_greedy(tiny_chat_dir, model, tok):
    """A request that leaves temperature out samples as the checkpoint says: with
    ``do_sample: false`` in its generation config that is greedy (temperature 0)."""
    from qwen.serving.app import _Server

    engine = Engine(model, tok)
    server = _Server(engine, "m", False)
    server.generation_config = copy.deepcopy(model.generation_config)
    server.generation_config.do_sample = True
    assert server._defaults()["temperature"] == (model.generation_config.temperature or 1.0)
    server.generation_config.do_sample = False
    assert server._defaults()["temperature"] == 0.0


def test_load_engine_names_the_broken_file(tiny_chat_dir, tmp_path):
    """load_engine raises CheckpointError naming the file and the fix, before loading:
    a missing directory, a config.json that is not JSON, a cut-short model.safetensors."""
    from qwen.demo_utils import CheckpointError
    from qwen.serving.app import load_engine

    with pytest.raises(CheckpointError, match="does not exist"):
        load_engine(str(tmp_path / "no-such-checkpoint"), cpu_only=True)
    for name, damage in (("config.json", b"{oops"), ("model.safetensors", None)):
        ckpt = tmp_path / name
        ckpt.mkdir()
        for path in tiny_chat_dir.iterdir():
            (ckpt / path.name).symlink_to(path)
        (ckpt / name).unlink()
        original = (tiny_chat_dir / name).read_bytes()
        (ckpt / name).write_bytes(damage if damage is not None else original[: len(original) // 2])
        with pytest.raises(CheckpointError, match=f"{ckpt / name} is .*(restore it|download it again)"):
            load_engine(str(ckpt), cpu_only=True)
