"""web_demo.py, driven as people use it: the real page in a real browser.

Playwright (Python) drives Debian's ``chromium`` (``scripts/test.sh`` installs it; Playwright's
own browser download is never used). Most tests share one page server in this process: the
library's :func:`qwen.web_demo.create_demo` over a real engine with a tiny random chat
checkpoint, instrumented from outside:

- each decoding step of the model is slowed down by ``Controls.delay`` seconds, so that an
  answer takes a few seconds and the browser sees it grow (the tiny model would otherwise
  finish before the page renders twice);
- ``Controls.submit`` records what the engine is asked (prompt token ids, settings) and what
  it answers; ``Controls.forced`` makes the model write a given text (the engine's
  ``forced_token_ids`` testing aid: the model still runs, its choices are replaced);
- ``Controls.fail`` makes the model's forward raise, as a failing GPU would.

What the page shows is read from the chat's DOM: each message's ``aria-label`` holds its raw
text, the rendered HTML is checked for code blocks, bold and KaTeX. One test starts
``web_demo.py`` itself as a subprocess and checks that the page fetches nothing from the
internet and the server calls nowhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Skipped where they are missing; under CI an unexpected skip fails the run (tests/conftest.py),
# and scripts/test.sh installs all three.
pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[web]")')
pytest.importorskip("playwright", reason='playwright is not installed (pip install -e ".[test]")')
# Debian's chromium package; else an installed Google Chrome (Ubuntu ships chromium as a snap).
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "google-chrome-stable", "google-chrome"))), None)
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium; scripts/test.sh does)", allow_module_level=True)

from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from qwen.demo_utils import load_chat_generation_config  # noqa: E402
from qwen.qwen_generation_utils import make_context  # noqa: E402
from qwen.web_demo import CUT_NOTE, DEFAULT_SYSTEM, STOPPED_NOTE, create_demo, launch  # noqa: E402

SCRIPT = REPO / "web_demo.py"
MAX_MODEL_LEN = 512  # the test server's context: a long message is easy to type
MAX_NEW_TOKENS = 64  # the checkpoint's max_new_tokens, as the test server's config says
STEP_DELAY = 0.03  # seconds added to each forward of the model
LOAD_TIMEOUT = 180  # seconds: starting a server (importing torch, gradio) on busy shared cores
WAIT = 90_000  # milliseconds: any wait in the browser
BROWSER_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The instrumented server


@dataclasses.dataclass
class Request:
    """One request the engine got, and what it answered."""

    prompt_ids: list[int]
    params: object
    handle: object = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Controls:
    """Instruments a live engine: records requests, forces answers, slows or breaks the model."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.requests: list[Request] = []
        self.forced: list[str] = []
        self.delay = STEP_DELAY
        self.fail = False
        self._submit = engine.submit
        self._forward = engine.model.forward
        engine.submit = self.submit
        engine.model.forward = self.forward

    def forward(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("injected failure: the device is gone")
        time.sleep(self.delay)
        return self._forward(*args, **kwargs)

    def submit(self, prompt_ids, params, callback, request_id=None):
        if self.forced:
            ids = self.tokenizer.encode(self.forced.pop(0), allowed_special=set(), disallowed_special=())
            params = dataclasses.replace(params, forced_token_ids=list(ids))
        record = Request(list(prompt_ids), params)

        def recording(update):
            record.text += update.text
            record.completion_tokens = update.completion_tokens
            if update.finished:
                record.finish_reason = update.finish_reason
                record.done.set()
            callback(update)

        record.handle = self._submit(prompt_ids, params, recording, request_id)
        self.requests.append(record)
        return record.handle

    def prompt(self, query: str, history=(), system: str = DEFAULT_SYSTEM) -> list[int]:
        """The ChatML prompt the model must get (the reference: the library's prompt builder)."""
        return make_context(self.tokenizer, query, history=list(history), system=system, max_window_size=None)[1]


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    from qwen.serving.app import load_engine

    engine = load_engine(str(tiny_chat_dir), max_model_len=MAX_MODEL_LEN, max_batch_size=4)
    controls = Controls(engine)
    config = load_chat_generation_config(str(tiny_chat_dir), True)
    config.max_new_tokens = MAX_NEW_TOKENS
    engine.start()
    demo = create_demo(engine, config, model_name="tiny-chat")
    port = free_port()
    launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    controls.url = f"http://127.0.0.1:{port}/"
    controls.config = config
    yield controls
    demo.close()
    engine.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True)
def _reset(request):
    if "server" in request.fixturenames:
        controls = request.getfixturevalue("server")
        controls.forced.clear()
        controls.fail = False
        controls.delay = STEP_DELAY


# ---------------------------------------------------------------------------------------------
# The page


# Records every change of the newest answer's raw text (its aria-label) with a timestamp.
WATCH_JS = """() => {
  window.__snaps = [];
  const chat = document.querySelector('#qwen-chat');
  const record = () => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const label = bots.length ? bots[bots.length - 1].getAttribute('aria-label') : null;
    const text = label === null ? null : label.replace(/^bot's message: /, '');
    const snaps = window.__snaps;
    if (!snaps.length || snaps[snaps.length - 1].text !== text) snaps.push({t: Date.now(), text: text});
  };
  new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true, attributes: true});
}"""
# window.__labels('bot' or 'user'): the raw text of each message the page shows.
LABELS_JS = """window.__labels = (role) =>
  [...document.querySelectorAll('#qwen-chat [data-testid="' + role + '"]')]
    .map(e => e.getAttribute('aria-label').replace(/^(bot|user)'s message: /, ''));"""


class ChatPage:
    def __init__(self, page, blocked: list[str]):
        self.page = page
        self.blocked = blocked  # requests to anywhere but the demo (aborted)
        self.box = page.locator("#qwen-message textarea")

    def until(self, condition, what: str) -> None:
        """Wait for ``condition()`` while the browser keeps running (Playwright's sync API
        only serves the browser while this thread is inside one of its calls)."""
        deadline = time.monotonic() + WAIT / 1000
        while not condition():
            if time.monotonic() > deadline:
                toasts = self.page.locator('[data-testid="toast-text"]').all_inner_texts()
                raise AssertionError(f"timed out waiting for {what} (toasts on the page: {toasts})")
            self.page.wait_for_timeout(50)

    def request(self, server: Controls, number: int) -> Request:
        """The engine's ``number``-th request (1-based), once it has come."""
        self.until(lambda: len(server.requests) >= number, f"request {number} to reach the engine")
        return server.requests[number - 1]

    def finished(self, request: Request) -> Request:
        self.until(request.done.is_set, "the engine to finish a request")
        return request

    def send(self, text: str) -> None:
        self.box.fill(text)
        self.box.press("Enter")

    def click(self, elem_id: str) -> None:
        self.page.locator(f"#{elem_id}").click()

    def answers(self) -> list[str]:
        return self.page.evaluate("() => __labels('bot')")

    def questions(self) -> list[str]:
        return self.page.evaluate("() => __labels('user')")

    def wait_answer(self, text: str, index: int = -1) -> None:
        """Wait until answer ``index`` reads ``text`` (raw)."""
        try:
            self.page.wait_for_function(
                "([text, index]) => __labels('bot').at(index) === text", arg=[text, index], timeout=WAIT
            )
        except PlaywrightTimeout:
            raise AssertionError(f"the page shows answers {self.answers()!r}, not {text!r}") from None
        self.wait_idle()

    def wait_idle(self) -> None:
        """Wait until no answer is being written: Send enabled, Stop disabled."""
        self.page.wait_for_function(
            "() => !document.querySelector('#qwen-send').disabled && document.querySelector('#qwen-stop').disabled",
            timeout=WAIT,
        )

    def wait_answers(self, count: int) -> None:
        self.page.wait_for_function("(n) => __labels('bot').length === n", arg=count, timeout=WAIT)

    def watch(self) -> None:
        self.page.evaluate(WATCH_JS)

    def snapshots(self) -> list[dict]:
        return self.page.evaluate("() => window.__snaps")

    def toast(self, pattern: str) -> str:
        """The text of a toast matching ``pattern`` (waits for it)."""
        toast = self.page.locator('[data-testid="toast-text"]', has_text=re.compile(pattern))
        toast.first.wait_for(timeout=WAIT)
        return toast.first.inner_text()

    def open_settings(self) -> None:
        self.page.locator("#qwen-settings").get_by_text("Generation settings").click()
        self.page.locator("#qwen-max-new-tokens input[type=number]").wait_for(timeout=WAIT)

    def set_number(self, elem_id: str, value) -> None:
        field = self.page.locator(f"#{elem_id} input[type=number]")
        field.fill(str(value))
        field.press("Tab")

    def set_numbers(self, values: dict[str, float]) -> None:
        """Set several number fields and make sure each still holds its value afterwards: on a
        loaded machine a component that was still rendering (the settings accordion had just
        opened) could put its old value back after a fill."""
        for _ in range(5):
            for elem_id, value in values.items():
                self.set_number(elem_id, value)
            self.page.wait_for_timeout(300)
            fields = {k: self.page.locator(f"#{k} input[type=number]").input_value() for k in values}
            if all(float(fields[k]) == float(v) for k, v in values.items()):
                return
        raise AssertionError(f"the settings did not keep their values: {fields}")


def open_chat(browser, url: str, **context_options) -> ChatPage:
    context = browser.new_context(viewport={"width": 1100, "height": 1100}, **context_options)
    blocked: list[str] = []

    def block(route):
        blocked.append(route.request.url)
        route.abort()

    # Only what goes elsewhere is intercepted, matched by a regular expression in the browser
    # driver: a Python predicate would hold every request until this thread next calls
    # Playwright, and an intercepted response is not streamed (the queue's events would
    # arrive all at once).
    context.route(re.compile(rf"^(?!{re.escape(url)}|data:|blob:)"), block)
    context.add_init_script(LABELS_JS)
    page = context.new_page()
    page.set_default_timeout(WAIT)
    page.goto(url, timeout=WAIT)
    page.locator("#qwen-message textarea").wait_for(timeout=WAIT)
    return ChatPage(page, blocked)


@pytest.fixture
def chat(server, browser):
    page = open_chat(browser, server.url)
    yield page
    assert not page.blocked, f"the page tried to fetch from the internet: {page.blocked}"
    page.page.context.close()


def streamed_updates(snaps: list[dict], final: str) -> list[str]:
    """The distinct partial answers the page showed before ``final`` (each a prefix of it)."""
    partial = [s["text"] for s in snaps if s["text"] and s["text"] != final]
    wrong = [text for text in partial if not final.startswith(text)]
    assert not wrong, f"not the start of the final answer {final!r}: {wrong}"
    return list(dict.fromkeys(partial))


# ---------------------------------------------------------------------------------------------
# Tests


def test_enter_sends_shift_enter_breaks_line_and_the_answer_streams(server, chat):
    chat.watch()
    chat.box.fill("first line")
    chat.box.press("Shift+Enter")  # a new line, not a send
    chat.box.type("second line")
    assert chat.box.input_value() == "first line\nsecond line"
    assert not server.requests or server.requests[-1].done.is_set()
    count = len(server.requests)
    chat.box.press("Enter")
    request = chat.request(server, count + 1)
    chat.finished(request)
    expected = request.text + ("\n\n" + CUT_NOTE if request.finish_reason == "length" else "")
    chat.wait_answer(expected)
    assert chat.questions() == ["first line\nsecond line"]
    assert chat.box.input_value() == ""  # the box was emptied
    # The model got the ChatML prompt of the raw message, with the checkpoint's settings.
    assert request.prompt_ids == server.prompt("first line\nsecond line")
    params, config = request.params, server.config
    assert (params.temperature, params.top_p, params.top_k) == (1.0, config.top_p, 0)
    assert (params.repetition_penalty, params.max_tokens, params.seed) == (
        config.repetition_penalty,
        MAX_NEW_TOKENS,
        None,
    )
    # It streamed: the page showed several growing partial answers before the final one.
    partial = streamed_updates(chat.snapshots(), expected)
    assert len(partial) >= 2, partial


def test_generation_settings_reach_the_model(server, chat):
    chat.open_settings()
    chat.set_numbers(
        {
            "qwen-temperature": 0,
            "qwen-top-p": 0.5,
            "qwen-top-k": 7,
            "qwen-max-new-tokens": 5,
            "qwen-repetition-penalty": 1.3,
        }
    )
    seed = chat.page.locator("#qwen-seed input")
    seed.fill("42")
    seed.press("Tab")
    count = len(server.requests)
    chat.send("settings?")
    request = chat.request(server, count + 1)
    params = request.params
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.5, 7)
    assert (params.max_tokens, params.repetition_penalty, params.seed) == (5, 1.3, 42)
    chat.finished(request)
    assert request.completion_tokens <= 5
    # Restoring the checkpoint's settings.
    chat.click("qwen-reset")
    chat.page.wait_for_function(
        "(n) => document.querySelector('#qwen-max-new-tokens input[type=number]').value === n",
        arg=str(MAX_NEW_TOKENS),
    )
    chat.wait_answers(1)
    chat.send("again")
    request = chat.request(server, count + 2)
    assert (request.params.temperature, request.params.max_tokens, request.params.seed) == (1.0, MAX_NEW_TOKENS, None)
    chat.finished(request)


def test_history_holds_raw_text_and_the_page_renders_it(server, chat):
    raw = (
        "Here is the code:\n\n```python\nprint('<b>hi</b>')\n```\n\nIt prints **bold** markup; the area is $\\pi r^2$."
    )
    server.forced += [raw, "You are welcome."]
    count = len(server.requests)
    chat.send("Show me *some* code")
    chat.wait_answer(raw)
    message = chat.page.locator('#qwen-chat [data-testid="bot"]').last
    # Rendered in the browser: a highlighted code block, bold text, KaTeX math.
    assert message.locator("pre code").inner_text().strip() == "print('<b>hi</b>')"
    assert message.locator("strong").inner_text() == "bold"
    assert message.locator(".katex").count() >= 1
    assert chat.page.locator('#qwen-chat [data-testid="user"] em').inner_text() == "some"
    chat.send("Thanks!")
    chat.wait_answer("You are welcome.")
    second = chat.request(server, count + 2)
    # The model gets the raw text of the previous turn, not the HTML the page rendered.
    assert second.prompt_ids == server.prompt("Thanks!", [("Show me *some* code", raw)])
    prompt = server.tokenizer.decode(second.prompt_ids)
    assert "```python\nprint('<b>hi</b>')\n```" in prompt and "<pre" not in prompt and "<code" not in prompt

    target = os.environ.get("QWEN_WEB_DEMO_SCREENSHOT")
    if target:  # docs/web_demo.png (see docs/web_demo.md)
        chat.page.screenshot(path=target, full_page=True, animations="disabled")
    # The copy button of the first answer copies its raw text.
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.page.locator('#qwen-chat .message-buttons-left button[aria-label="Copy message"]').first.click()
    chat.page.wait_for_function("async (raw) => (await navigator.clipboard.readText()) === raw", arg=raw)


def test_regenerate_replaces_the_last_answer(server, chat):
    server.forced += ["The first answer.", "A second answer."]
    count = len(server.requests)
    chat.send("Tell me something")
    chat.wait_answer("The first answer.")
    chat.click("qwen-regenerate")
    chat.wait_answer("A second answer.")
    assert chat.answers() == ["A second answer."] and chat.questions() == ["Tell me something"]
    first, second = chat.request(server, count + 1), chat.request(server, count + 2)
    assert second.prompt_ids == first.prompt_ids == server.prompt("Tell me something")  # not the old answer


def test_stop_keeps_the_partial_answer_marked_as_stopped(server, chat):
    chat.open_settings()
    chat.set_number("qwen-max-new-tokens", 400)  # minutes at this speed, unless stopped
    chat.watch()
    count = len(server.requests)
    chat.send("Write a long story")
    request = chat.request(server, count + 1)
    chat.page.wait_for_function("() => window.__snaps.filter(s => s.text).length >= 3", timeout=WAIT)
    chat.click("qwen-stop")
    chat.finished(request)
    assert request.finish_reason == "cancelled" and 0 < request.completion_tokens < 400
    partial = request.text
    chat.wait_answer(f"{partial}\n\n{STOPPED_NOTE}" if partial else STOPPED_NOTE)
    # The partial answer stays in the conversation the model sees.
    chat.click("qwen-reset")
    chat.send("Go on")
    follow = chat.request(server, count + 2)
    assert follow.prompt_ids == server.prompt("Go on", [("Write a long story", partial)])
    chat.finished(follow)


def test_clear_and_system_prompt(server, chat):
    server.forced += ["Arr.", "Aye."]
    count = len(server.requests)
    system = chat.page.locator("#qwen-system textarea")
    system.fill("You are a pirate.")
    chat.send("Who are you?")
    chat.wait_answer("Arr.")
    assert chat.request(server, count + 1).prompt_ids == server.prompt("Who are you?", system="You are a pirate.")
    chat.click("qwen-clear")
    chat.page.wait_for_function("() => __labels('user').length === 0")
    assert chat.answers() == []
    chat.send("And now?")
    chat.wait_answer("Aye.")
    # Nothing of the cleared conversation reaches the model.
    assert chat.request(server, count + 2).prompt_ids == server.prompt("And now?", system="You are a pirate.")


def test_two_browsers_chat_at_once_with_their_own_histories(server, browser, chat):
    other = open_chat(browser, server.url)
    try:
        pages = [chat, other]
        for page in pages:
            page.watch()
        count = len(server.requests)
        chat.send("Question from A")
        other.send("Question from B")
        a, b = chat.request(server, count + 1), chat.request(server, count + 2)
        if a.prompt_ids != server.prompt("Question from A"):
            a, b = b, a
        assert a.prompt_ids == server.prompt("Question from A")
        assert b.prompt_ids == server.prompt("Question from B")
        finals = []
        for page, request in zip(pages, (a, b), strict=True):
            chat.finished(request)
            final = request.text + ("\n\n" + CUT_NOTE if request.finish_reason == "length" else "")
            page.wait_answer(final)
            finals.append(final)
        # In the engine: both were being decoded before either finished (one batch).
        assert a.handle.first_token_at < b.handle.finished_at and b.handle.first_token_at < a.handle.finished_at
        # In the browsers: both answers grew on screen before either was complete.
        snaps = [page.snapshots() for page in pages]
        done_at = [
            min(s["t"] for s in page_snaps if s["text"] == final)
            for page_snaps, final in zip(snaps, finals, strict=True)
        ]
        first_end = min(done_at)
        for page_snaps, final in zip(snaps, finals, strict=True):
            partial = [s for s in page_snaps if s["text"] and s["text"] != final and s["t"] < first_end]
            assert len({s["text"] for s in partial}) >= 2, f"streamed before the first answer ended: {partial}"
        # Each page has its own conversation.
        assert chat.questions() == ["Question from A"] and other.questions() == ["Question from B"]
        server.forced += ["Second answer for A."]
        chat.send("Follow-up from A")
        chat.wait_answer("Second answer for A.")
        follow = chat.request(server, count + 3)
        assert follow.prompt_ids == server.prompt("Follow-up from A", [("Question from A", a.text)])
        assert not other.blocked
    finally:
        other.page.context.close()


def test_errors_reach_the_page_and_it_keeps_working(server, chat):
    count = len(server.requests)
    # An empty message.
    chat.box.fill("   ")
    chat.box.press("Enter")
    assert "Type a message first" in chat.toast("Type a message")
    # Nothing to regenerate yet.
    chat.click("qwen-regenerate")
    chat.toast("no answer to regenerate")
    # A message longer than the context: a clear message, and the text stays in the box.
    long_text = "hello " * MAX_MODEL_LEN
    chat.send(long_text)
    assert f"{MAX_MODEL_LEN:,} tokens" in chat.toast("too long")
    chat.page.wait_for_function("() => __labels('user').length === 0")
    chat.page.wait_for_function(
        "(text) => document.querySelector('#qwen-message textarea').value === text", arg=long_text
    )
    assert len(server.requests) == count  # the engine was never asked
    # The model fails while answering.
    server.fail = True
    chat.send("Will this work?")
    assert "injected failure" in chat.toast("Generation failed")
    assert chat.finished(chat.request(server, count + 1)).finish_reason == "error"
    chat.page.wait_for_function("() => document.querySelector('#qwen-message textarea').value === 'Will this work?'")
    assert chat.questions() == []
    # And then it works again.
    server.fail = False
    server.forced += ["It works."]
    chat.box.press("Enter")
    chat.wait_answer("It works.")
    assert chat.questions() == ["Will this work?"]


# ---------------------------------------------------------------------------------------------
# The script


def run_script(*args: str, timeout: float = LOAD_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_help_lists_the_options():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--checkpoint-path", "--cpu-only", "--share", "--inbrowser", "--server-name", "--server-port"):
        assert option in result.stdout


def test_a_bad_checkpoint_is_one_line(tmp_path):
    result = run_script("-c", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint directory {tmp_path / 'missing'} does not exist"


class _Trap:
    """A TCP listener that counts connections: the server's proxy, so that any call it makes
    to the internet (analytics, version checks, fonts) comes here instead."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()


def test_the_script_serves_the_chat_offline(tiny_chat_dir, browser):
    trap = _Trap()
    port = free_port()
    proxy = f"http://127.0.0.1:{trap.port}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")},
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the script turns analytics off by itself
    command = [sys.executable, str(SCRIPT), "-c", str(tiny_chat_dir), "--cpu-only", "--server-port", str(port)]
    log = Path(tiny_chat_dir).parent / f"web_demo_{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command + ["--max-model-len", "256"], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT
        while "Running on local URL" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        requests: list[str] = []
        chat = open_chat(browser, f"http://127.0.0.1:{port}/")
        chat.page.on("request", lambda r: requests.append(r.url))
        try:
            chat.send("Hello")
            chat.page.wait_for_function("() => __labels('bot').some(a => a.length > 0)")
            assert chat.questions() == ["Hello"]
            assert not chat.blocked, f"the page fetched from the internet: {chat.blocked}"
            assert all(urlparse(u).hostname == "127.0.0.1" for u in requests if u.startswith("http"))
        finally:
            chat.page.context.close()
        assert trap.connections == 0, "the server called the internet (through the proxy)"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()
