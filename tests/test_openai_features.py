"""The server's answers to what real clients ask for (issue 26): limits on oversized
requests, logprobs, constrained JSON, Qwen-style functions, forced and several tool
calls, logit_bias; driven with the ``openai`` client, LangChain's ``ChatOpenAI`` and
lm-evaluation-harness' ``local-completions``.

Log-probabilities are checked against the float32 model run in this process (and, where
lm-eval is installed, lm-eval's ``--model hf`` on the same checkpoint); constrained
output against ``jsonschema``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_openai_api import GREEDY, SYSTEM, TOOLS, WEATHER, Server, _error

from qwen.qwen_generation_utils import make_context
from qwen.serving.app import PREFIX_SLACK, count_tokens_capped, default_max_body_bytes
from qwen.serving.function_call import react_instruction

NO_EOS = {"temperature": 0, "extra_body": {**GREEDY["extra_body"], "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    srv = Server(tiny_chat_dir, tmp_path_factory.mktemp("features") / "log.txt", "--enable-test-hooks")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="module")
def model(tiny_chat_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()


def _token_ids(tok) -> dict[bytes, int]:
    return {**tok.mergeable_ranks, **{text.encode(): i for text, i in tok.special_tokens.items()}}


def _token_text(tok, token: int) -> str:
    """How OpenAI shows a token: its text, or bytes:\\x.. where it is not whole UTF-8."""
    raw = {i: b for b, i in _token_ids(tok).items()}[token]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of the next token after each prefix."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# --------------------------------------------------------------------------- oversized requests


def test_count_tokens_capped_reads_a_prefix_only(tok):
    encode = tok.encode
    seen = []

    def counting(text):
        seen.append(len(text))
        return encode(text)

    fitting = "hello world, 你好 " * 300
    assert count_tokens_capped(counting, fitting, 8192) == len(encode(fitting))
    seen.clear()
    huge = "hello world " * 2_000_000  # 24 MB
    count = count_tokens_capped(counting, huge, 8192)
    assert count > 8192 + PREFIX_SLACK
    assert sum(seen) < 200_000  # a few prefixes, not the 24 MB
    assert default_max_body_bytes(8192) == 1 << 20 and default_max_body_bytes(32768) == 2 << 20


def test_oversized_requests_are_refused_before_the_work(server, client):
    """Bodies over the limit get a 413 (at once from Content-Length, or while a chunked
    body arrives), text that cannot fit a 400 before all of it is tokenized; a small
    request is answered meanwhile and the server's memory does not grow by the bodies'
    size."""
    psutil = pytest.importorskip("psutil")
    limit = default_max_body_bytes(8192)
    url = f"{server.url}/v1/chat/completions"
    small = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY)
    client.chat.completions.create(**small)  # warm
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss

    big = json.dumps({"messages": [{"role": "user", "content": "hello world " * 4_000_000}]}).encode()  # 48 MB
    start = time.monotonic()
    error = _error(httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=60), 413)
    assert error["code"] == "request_too_large" and str(limit) in error["message"]
    assert time.monotonic() - start < 10

    # A chunked body (no Content-Length): a first part, then a pause until a small request
    # has been answered (or 30 s), then the rest; refused once past the limit.
    answered = {}
    small_done = threading.Event()

    def chunked_body():
        step = 64 << 10
        for k in range(0, 3 * limit, step):
            if k == 4 * step:
                answered["paused_at"] = time.monotonic()
                small_done.wait(30)
            yield big[k : k + step]

    def upload():
        response = httpx.post(url, content=chunked_body(), headers={"content-type": "application/json"}, timeout=60)
        answered["upload"] = (response.status_code, response.json()["error"]["code"])

    thread = threading.Thread(target=upload)
    thread.start()
    while "paused_at" not in answered and thread.is_alive():
        time.sleep(0.01)
    start = time.monotonic()
    reply = client.chat.completions.create(**small)  # while the upload is half done
    took = time.monotonic() - start
    small_done.set()
    thread.join(60)
    assert reply.choices[0].finish_reason in ("stop", "length") and took < 20
    assert answered["upload"] == (413, "request_too_large")

    # Within the limit but far beyond the context: refused from a prefix of the text.
    huge_text = "hello world " * 80_000  # 960 kB, about 160k tokens
    for path, body, param in (
        ("chat/completions", {"messages": [{"role": "user", "content": huge_text}]}, "messages"),
        ("completions", {"prompt": huge_text}, "prompt"),
    ):
        start = time.monotonic()
        error = _error(httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        assert "maximum context length is 8192 tokens" in error["message"]
        assert time.monotonic() - start < 10
    grown = proc.memory_info().rss - before
    assert grown < limit + (8 << 20), f"the server grew by {grown / 1e6:.1f} MB"
    assert server.health()["status"] == "ok"


# --------------------------------------------------------------------------- logprobs


def test_chat_logprobs_equal_the_model(client, model, tok):
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, **NO_EOS
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    _, prompt = make_context(tok, "Name three colours.", system=SYSTEM, max_window_size=None)
    by_bytes = _token_ids(tok)
    generated = [by_bytes[bytes(e.bytes)] for e in entries]
    expected = _log_softmax(model, prompt + generated)[len(prompt) - 1 : -1]
    for k, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[k, generated[k]]), abs=1e-4)
        values, ids = torch.topk(expected[k], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [by_bytes[bytes(t.bytes)] for t in entry.top_logprobs] == ids.tolist()
        assert entry.token == _token_text(tok, generated[k])
    # greedy: the chosen token is the most likely one
    assert all(e.top_logprobs[0].logprob == e.logprob for e in entries)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, stream=True, **NO_EOS
        )
    )  # fmt: skip
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_echo_logprobs_equal_the_model(client, model, tok):
    text = "The quick brown fox jumps"
    ids = tok.encode(text)
    reply = client.completions.create(model="m", prompt=ids, max_tokens=3, logprobs=2, echo=True, **GREEDY)
    scores = reply.choices[0].logprobs
    count = len(ids) + reply.usage.completion_tokens
    assert len(scores.tokens) == len(scores.token_logprobs) == len(scores.top_logprobs) == count
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None
    generated = []  # greedy, by the model here
    for _ in range(3):
        generated.append(int(_log_softmax(model, ids + generated)[-1].argmax()))
    assert scores.tokens == [_token_text(tok, t) for t in ids + generated]
    expected = _log_softmax(model, ids + generated)
    for k in range(1, count):
        token = (ids + generated)[k]
        assert scores.token_logprobs[k] == pytest.approx(float(expected[k - 1, token]), abs=1e-4)
        assert scores.tokens[k] in scores.top_logprobs[k] and len(scores.top_logprobs[k]) in (2, 3)
    # offsets point into the returned text
    full = reply.choices[0].text
    assert full.startswith(text)
    for token, offset in zip(scores.tokens, scores.text_offset, strict=True):
        assert full[offset : offset + len(token)] == token
    # logprobs=0: the chosen tokens only; without echo: the completion only
    only = client.completions.create(model="m", prompt=text, max_tokens=3, logprobs=0, **GREEDY)
    assert only.choices[0].logprobs.token_logprobs == scores.token_logprobs[len(ids) :]
    assert all(len(top) == 1 for top in only.choices[0].logprobs.top_logprobs)
    chunks = list(
        client.completions.create(model="m", prompt=ids, max_tokens=3, logprobs=2, echo=True, stream=True, **GREEDY)
    )
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == scores.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == full


def test_lm_eval_local_completions_equals_hf(server, tiny_chat_dir, tmp_path):
    """lm-eval's ``local-completions`` through the server scores a small multiple-choice
    task as lm-eval's ``--model hf`` does on the same checkpoint."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    rows = [
        {"question": "The sky is", "choices": [" blue", " green", " loud", " made of cheese"], "answer": 0},
        {"question": "Two plus two equals", "choices": [" four", " five", " seven"], "answer": 0},
        {"question": "Water freezes at", "choices": [" zero degrees", " a hundred degrees"], "answer": 1},
        {"question": "你好，", "choices": ["世界", "朋友们", "再见"], "answer": 2},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    tasks = TaskManager(include_path=str(tmp_path))
    results = {}
    for name, args in (
        ("hf", f"pretrained={tiny_chat_dir},dtype=float32,prefix_token_id=151643"),
        (
            "local-completions",
            f"model=m,base_url={server.url}/v1/completions,tokenizer={tiny_chat_dir},"
            "tokenizer_backend=huggingface,prefix_token_id=151643,max_retries=1,num_concurrent=2",
        ),
    ):
        out = lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=["tiny_mc"],
            task_manager=tasks,
            log_samples=True,
            batch_size=1,
            device="cpu",
        )
        samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
        results[name] = (out["results"]["tiny_mc"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples])
    (hf_acc, hf_ll), (api_acc, api_ll) = results["hf"], results["local-completions"]
    assert api_acc == hf_acc
    assert [len(q) for q in api_ll] == [len(r["choices"]) for r in rows]
    for hf_q, api_q in zip(hf_ll, api_ll, strict=True):
        assert api_q == pytest.approx(hf_q, abs=1e-3)


# --------------------------------------------------------------------------- constrained JSON

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer", "minimum": -9, "maximum": 9}},
                "required": ["k", "v"],
            },
        },
    },
    "required": ["name", "age", "ok", "tags"],
}


def closing_bias(tok) -> dict[str, float]:
    return {str(tok.encode(text)[0]): 8 for text in ('"', "}", '"}')}


def test_json_schema_outputs_always_validate(client, tok):
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": NESTED, "strict": True}}

    def ask(seed):
        return client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "A person, as JSON."}],
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(50)))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), NESTED)
    assert len({r.choices[0].message.content for r in replies}) > 10  # sampled, not one fixed answer
    # JSON mode: an object; streamed too. (Any object: a random model may write strings
    # without end, so closing quotes and braces are made likelier.)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "JSON"}], max_tokens=200, temperature=1.0, seed=0,
            response_format={"type": "json_object"}, stream=True, logit_bias=closing_bias(tok),
        )
    )  # fmt: skip
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)


def test_response_format_errors(server):
    url = f"{server.url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "x"}]}
    for fmt, param in (
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}}, "response_format"),
    ):
        assert _error(httpx.post(url, json={**base, "response_format": fmt}, timeout=30), 400)["param"] == param
    error = _error(httpx.post(url, json={**base, "response_format": {"type": "json_object"}, "tools": TOOLS}), 400)
    assert error["param"] == "response_format"
    assert server.health()["status"] == "ok"


def test_langchain_chat_openai(server, tok):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="m", temperature=1.0, max_tokens=120, seed=1)
    reply = llm.bind(logprobs=True, top_logprobs=2).invoke([HumanMessage("Hi")])
    content = reply.response_metadata["logprobs"]["content"]
    assert len(content) == reply.usage_metadata["output_tokens"] and len(content[0]["top_logprobs"]) == 2

    closing = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="none", model="m", temperature=1.0, max_tokens=120, seed=0,
        logit_bias={int(k): v for k, v in closing_bias(tok).items()},
    )  # fmt: skip
    as_json = closing.with_structured_output(None, method="json_mode").invoke("Reply in JSON.")
    assert isinstance(as_json, dict)

    class Pet(BaseModel):
        kind: str = Field(max_length=10)
        legs: int = Field(ge=0, le=8)

    pet = llm.with_structured_output(Pet, method="json_schema").invoke("A pet.")
    assert isinstance(pet, Pet)

    forced = 'Thought: two cities\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
    forced += 'Action: get_weather\nAction Input: {"city": "Rome"}\nObservation:'
    tooled = llm.bind_tools([WEATHER], extra_body={"forced_output": forced}).invoke("Weather in Paris and Rome?")
    assert [(c["name"], c["args"]) for c in tooled.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]


# --------------------------------------------------------------------------- functions and tool calls

# The original Qwen server's function format (sent through `functions` by openai<1.0 clients).
QWEN_WEATHER = {
    "name_for_human": "Weather",
    "name_for_model": "weather",
    "description_for_model": "Current weather of a city.",
    "parameters": [
        {"name": "city", "description": "the city", "required": True, "schema": {"type": "string", "enum": ["Paris", "Rome"]}}
    ],
}  # fmt: skip


def test_qwen_style_functions(server, tok):
    """Described as the original server did: ``name_for_model: Call this tool to interact
    with the name_for_human API. ...`` with the parameter list as JSON; calls come back
    under ``name_for_model`` (the only name given)."""
    url = f"{server.url}/v1/chat/completions"
    call = 'Thought: I need it.\nAction: weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
    question = [{"role": "user", "content": "Weather in Paris?"}]
    description = (
        "weather: Call this tool to interact with the Weather API. What is the Weather API useful for? "
        "Current weather of a city. Parameters: " + json.dumps(QWEN_WEATHER["parameters"], ensure_ascii=False)
    )
    for body in (
        {"functions": [QWEN_WEATHER]},
        {"tools": [{"type": "function", "function": QWEN_WEATHER}]},
    ):
        reply = httpx.post(url, json={"messages": question, "forced_output": call, **body}, timeout=60)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        made = choice["message"]["function_call"] if "functions" in body else choice["message"]["tool_calls"][0]
        made = made.get("function", made)
        assert made["name"] == "weather" and json.loads(made["arguments"]) == {"city": "Paris"}
        query = react_instruction([QWEN_WEATHER]) + "\n\nQuestion: Weather in Paris?"
        _, ids = make_context(tok, query, system=SYSTEM, max_window_size=None)
        assert reply.json()["usage"]["prompt_tokens"] == len(ids)
    # the prompt as the original server wrote it
    assert description + " Format the arguments as a JSON object." in react_instruction([QWEN_WEATHER])
    bad = {"messages": question, "functions": [{"name_for_model": "w", "parameters": [{"description": "no name"}]}]}
    assert _error(httpx.post(url, json=bad, timeout=30), 400)["param"] == "functions.0.parameters.0"


@pytest.mark.parametrize("between", ["", "Thought: and then\n"])
def test_parse_several_actions(between):
    from qwen.serving.function_call import parse_react

    text = f'Thought: two\nAction: get_weather\nAction Input: {{"city": "Paris"}}\n{between}'
    text += 'Action: get_weather\nAction Input: {"city": "Rome"}\nObservation: x\nAction: get_weather\nAction Input: {}'
    reply = parse_react(text, {"get_weather"})
    assert reply.content == "two" and reply.calls == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_weather", '{"city": "Rome"}'),
    ]  # actions after an observation are not this turn's
    broken = text.replace('{"city": "Rome"}', "{oops")
    assert parse_react(broken, {"get_weather"}).calls == [] and parse_react(broken).content == broken.strip()


def test_tool_choice_required_and_named_force_a_valid_call(client):
    """A random model never writes ReAct by itself; under tool_choice "required" or a
    named function the constraint makes it call, with arguments matching the schema."""
    cities = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": cities}},
        {"type": "function", "function": QWEN_WEATHER},
    ]
    question = [{"role": "user", "content": "Weather in Paris?"}]

    def ask(choice):
        return client.chat.completions.create(
            model="m", messages=question, tools=tools, tool_choice=choice, max_tokens=300, temperature=1.0, seed=5
        )

    named = {"type": "function", "function": {"name": "weather"}}
    with ThreadPoolExecutor(2) as pool:
        required, forced = pool.map(ask, ["required", named])
    for reply in (required, forced):
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "weather")
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert forced.choices[0].message.tool_calls[0].function.name == "weather"


def test_several_tool_calls_in_one_turn(client):
    question = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    forced = 'Thought: two\nAction: get_weather\nAction Input: {"city": "Paris"}\nThought: and\n'
    forced += 'Action: get_weather\nAction Input: {"city": "Rome"}\nObservation:'
    kwargs = dict(model="m", messages=question, tools=TOOLS, extra_body={"forced_output": forced})
    reply = client.chat.completions.create(**kwargs)
    calls = reply.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c.id for c in calls}) == 2 and reply.choices[0].message.content == "two"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, json.loads(d.function.arguments)["city"]) for d in deltas] == [(0, "Paris"), (1, "Rome")]
    single = client.chat.completions.create(parallel_tool_calls=False, **kwargs)
    assert len(single.choices[0].message.tool_calls) == 1
    # the calls and their results go back as consecutive actions
    followup = [
        *question,
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "rainy"},
    ]
    answer = client.chat.completions.create(
        model="m", messages=followup, tools=TOOLS, extra_body={"forced_output": " done\nFinal Answer: ok"}
    )
    assert answer.choices[0].message.content == "ok"


# --------------------------------------------------------------------------- logit_bias


def test_logit_bias(server, client, tok):
    ids = tok.encode("The quick brown fox")
    base = dict(model="m", prompt=ids, max_tokens=4, logprobs=1, **GREEDY)
    plain = client.completions.create(**base).choices[0].logprobs
    token = tok.encode(" banana")[0]
    forced = client.completions.create(**base, logit_bias={str(token): 100}).choices[0].logprobs
    assert forced.tokens == [" banana"] * 4
    first = _token_ids(tok)[plain.tokens[0].encode()]
    banned = client.completions.create(**base, logit_bias={str(first): -100}).choices[0].logprobs
    assert banned.tokens[0] != plain.tokens[0]
    # the reported logprobs are the model's, before the bias
    assert banned.top_logprobs[0][plain.tokens[0]] == pytest.approx(plain.token_logprobs[0], abs=1e-5)
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logit_bias={str(token): 100},
        **NO_EOS,
    )  # fmt: skip
    assert chat.choices[0].message.content == "banana banana banana"
    url = f"{server.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    for bias in ({"banana": 5}, {"-3": 1}, {"999999": 1}, {"10": 101}, {"10": -100.5}):
        error = _error(httpx.post(url, json={"messages": messages, "logit_bias": bias}, timeout=30), 400)
        assert error["param"] == "logit_bias", bias
    assert server.health()["status"] == "ok"


def test_max_body_bytes_flag():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("openai_api_script", REPO / "openai_api.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args(["-c", "x"]).max_body_bytes is None  # the default follows the context length
    assert script.parse_args(["-c", "x", "--max-body-bytes", "4M"]).max_body_bytes == 4 << 20
    assert script.parse_args(["-c", "x", "--max-body-bytes", "65536"]).max_body_bytes == 65536
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit):
            script.parse_args(["-c", "x", "--max-body-bytes", bad])
