"""cli_demo.py, driven as a user drives it: through a pseudo-terminal (pexpect).

The script loads a tiny random chat checkpoint (``python -m qwen tiny --chat``), which
never emits ``<|im_end|>``: every answer runs to ``max_new_tokens``, so the session keeps
that small. Loading takes most of the time, so one session covers most steps, and the
sessions are all started at once, before the first test needs one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

pexpect = pytest.importorskip("pexpect")

SCRIPT = REPO / "cli_demo.py"
PROMPT = "User> "
ANSWER = "Qwen: "
END_OF_ANSWER = "\r\n\r\n" + PROMPT  # the pty turns "\n" into "\r\n"
LOAD_TIMEOUT = 180  # seconds: importing torch and transformers on busy shared cores
STEP_TIMEOUT = 60


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TERM": "dumb",  # no readline escape sequences in the output
        "PYTHONIOENCODING": "utf-8",
        "HF_HUB_OFFLINE": "1",  # never touch the network
        "OMP_NUM_THREADS": "1",  # a tiny model gains nothing from threads; sessions run side by side
        **extra,
    }


def spawn(checkpoint) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        [str(SCRIPT), "-c", str(checkpoint)],
        cwd=str(REPO),
        env=env(),
        encoding="utf-8",
        codec_errors="replace",
        timeout=STEP_TIMEOUT,
        dimensions=(50, 200),
        # Ctrl-C must reach the script even when the test run itself ignores SIGINT
        # (a background job of a non-interactive shell, e.g. `nohup bash .ci/run &`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def run_script(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=LOAD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def command(child, line: str) -> str:
    """Send a command; return what it printed (starting with the echoed line)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def ask(child, question: str) -> str:
    """Send a message; return the answer exactly as the terminal shows it."""
    child.sendline(question)
    child.expect_exact(ANSWER)
    child.expect_exact(END_OF_ANSWER)
    return child.before


def exit_status(child) -> int | None:
    child.expect(pexpect.EOF, timeout=STEP_TIMEOUT)
    child.close()
    return child.exitstatus


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def sessions(tiny_chat_dir):
    """Three sessions on the tiny chat checkpoint, started before the first test of this file
    so that they load in parallel with each other and with the tests that need no model."""
    children = {name: spawn(tiny_chat_dir) for name in ("main", "ctrl-c", "ctrl-d")}
    yield children
    for child in children.values():
        if child.isalive():
            child.close(force=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir):
    from transformers import AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen-1 classes)

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="module")
def base_dir(tiny_chat_dir, tmp_path_factory):
    """A base checkpoint: what tells the tiny base and chat checkpoints apart is their
    generation_config.json (chat_format "raw" vs "chatml"), so link the chat checkpoint's
    files and write the base model's generation config."""
    from qwen.tiny import BASE_GENERATION_CONFIG

    out = tmp_path_factory.mktemp("ckpt") / "tiny-base"
    out.mkdir()
    for path in tiny_chat_dir.iterdir():
        if path.name != "generation_config.json":
            (out / path.name).symlink_to(path)
    (out / "generation_config.json").write_text(json.dumps(BASE_GENERATION_CONFIG), encoding="utf-8")
    return out


def at_prompt(child) -> str:
    """Wait for the first prompt; return the banner."""
    child.expect_exact(PROMPT, timeout=LOAD_TIMEOUT)
    return child.before


# --------------------------------------------------------------------------- without a model


def test_help():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--checkpoint-path", "--cpu-only", "--seed", "--system", ":clear-history", ":conf", ":reset-conf"):
        assert option in result.stdout
    assert "Qwen/Qwen-7B-Chat" in result.stdout  # the default checkpoint


@pytest.mark.parametrize("case", ["missing path", "base model", "qwen2 export", "hub name offline"])
def test_checkpoint_errors_are_one_line(case, base_dir, tiny_chat_dir, tmp_path):
    if case == "qwen2 export":  # what convert-qwen2 writes: config.json model_type qwen2, no chat_format
        export = tmp_path / "export"
        export.mkdir()
        config = json.loads((tiny_chat_dir / "config.json").read_text()) | {"model_type": "qwen2"}
        (export / "config.json").write_text(json.dumps(config))
        (export / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
        result = run_script("-c", str(export))
        expected = "Qwen2-layout export"
    elif case == "missing path":
        result = run_script("-c", str(tmp_path / "no-such-checkpoint"))
        expected = "does not exist"
    elif case == "base model":
        result = run_script("-c", str(base_dir))
        expected = "not a chat model"
    else:  # an empty cache and HF_HUB_OFFLINE=1: the name can be neither found nor downloaded
        result = run_script("-c", "Qwen/Qwen-NoSuchModel-Chat", HF_HOME=str(tmp_path / "hf-home"))
        expected = "HF_HUB_OFFLINE"
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("error: ") and expected in output, output


# --------------------------------------------------------------------------- a session


def test_chat_session(sessions, tokenizer):
    child = sessions["main"]
    banner = at_prompt(child)
    assert ":q" in banner and ":conf" in banner and "cpu" in banner

    out = command(child, ":conf max_new_tokens=8")
    assert "max_new_tokens = 8" in out

    # A question gets an answer, streamed after the answer prefix; :his shows the turn.
    question = "Hello! Who are you?"
    first = ask(child, question)
    assert first.strip()
    history = command(child, ":his")
    assert "History (1 turn)" in history
    assert f"User[0]: {question}\r\n" in history
    assert f"Qwen[0]: {first}\r\n" in history

    out = command(child, ":clh")
    assert "history cleared" in out
    history = command(child, ":his")
    assert "History (0 turns)" in history and question not in history

    # The seed is applied before every answer: the same question in the same (empty)
    # context gets the same sampled answer, and another seed another one.
    assert "set to 7" in command(child, ":seed 7")
    assert "random seed: 7" in command(child, ":seed")
    seeded = ask(child, question)
    command(child, ":clh")
    assert ask(child, question) == seeded
    command(child, ":clh")
    command(child, ":seed 8")
    assert ask(child, question) != seeded, "sampling should depend on the seed"
    command(child, ":clh")
    command(child, ":seed 7")

    # :conf max_new_tokens caps the answer.
    assert len(tokenizer.encode(seeded.replace("\r\n", "\n"))) > 5
    out = command(child, ":conf max_new_tokens=5")
    assert "max_new_tokens = 5" in out and "max_new_tokens = 5" in command(child, ":conf")
    short = ask(child, question)
    assert 0 < len(tokenizer.encode(short.replace("\r\n", "\n"))) <= 5
    assert seeded.startswith(short.rstrip("\ufffd"))  # same seed: the same first tokens

    # Bad :conf arguments get a message, change nothing, and the session goes on.
    for bad, message in [
        (":conf max_new_tokens=many", "must be an integer"),
        (":conf top_p=2", "at most 1"),
        (":conf do_sample=maybe", "true or false"),
        (":conf max_new_token=3", "did you mean max_new_tokens"),
        (":conf max_new_tokens", "key=value"),
    ]:
        out = command(child, bad)
        assert "[ERROR]" in out and message in out and "Traceback" not in out, out
    assert "max_new_tokens = 5" in command(child, ":conf")
    assert "max_new_tokens = 512" in command(child, ":reset-conf")  # the checkpoint's value
    command(child, ":conf max_new_tokens=2000")

    # Ctrl-C while the long answer streams: back at the prompt, the turn is not kept.
    child.sendline("Tell me a very long story.")
    child.expect_exact(ANSWER)
    child.expect(r"\S")  # the first piece of the answer is on screen
    child.sendintr()
    child.expect_exact("answer interrupted")
    child.expect_exact(PROMPT)
    history = command(child, ":his")
    assert "History (1 turn)" in history and "long story" not in history

    # A line ending in a backslash continues the message on the next line.
    command(child, ":conf max_new_tokens=3")
    child.sendline("first line \\")
    child.expect_exact(" ...> ")
    ask(child, "second line")
    history = command(child, ":his")
    assert "History (2 turns)" in history and "User[1]: first line \r\nsecond line\r\n" in history
    # "::" sends a message that starts with a colon (not a command)
    ask(child, "::conf x")
    assert "User[2]: :conf x\r\n" in command(child, ":his")
    assert ":reset-conf" in command(child, ":h")

    child.sendline(":q")
    assert exit_status(child) == 0
    assert "Traceback" not in child.before


@pytest.mark.parametrize("key", ["ctrl-c", "ctrl-d"])
def test_exit_at_prompt(sessions, key):
    child = sessions[key]
    at_prompt(child)
    if key == "ctrl-c":
        child.sendintr()
    else:
        child.sendeof()
    assert exit_status(child) == 0
    assert "Traceback" not in child.before


def test_conf_none_and_stop_words(tiny_chat_dir):
    """``key=none`` gives transformers' own default, which generate() keeps (a None would
    be filled from the checkpoint's generation config again); settings without such a
    default need a value; ``stop_words_ids`` is checked before the next answer."""
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401  (registers the Auto classes)
    from qwen.demo_utils import SettingError, updated_config

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    config = model.generation_config
    assert config.top_p == 0.8 and config.max_new_tokens == 512  # the checkpoint's
    new, _ = updated_config(config, "top_p=none top_k=none repetition_penalty=none")
    used, _ = model._prepare_generation_config(new)
    assert (used.top_p, used.top_k, used.repetition_penalty) == (1.0, 50, 1.0)
    with pytest.raises(SettingError, match="no transformers default"):
        updated_config(config, "max_new_tokens=none")
    new, _ = updated_config(config, "stop_words_ids=[[1, 2], [3]]")
    assert new.stop_words_ids == [[1, 2], [3]]
    assert updated_config(config, "stop_words_ids=none")[0].stop_words_ids == []
    for bad in ("5", '"abc"', "[[]]", "[[-1]]", "[1, 2]"):
        with pytest.raises(SettingError, match="list of token-id lists"):
            updated_config(config, f"stop_words_ids={bad}")


def test_undecodable_input_is_refused_not_sent(tiny_chat_dir):
    """Bytes that are not UTF-8 (piped in, or a terminal in another encoding) get the
    "type it again" message; they are neither answered nor kept in the history, and the
    lines around them still work."""
    piped = b":conf max_new_tokens=2\n\xff\xfehello\n:his\n:q\n"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "-c", str(tiny_chat_dir), "--cpu-only"],
        cwd=REPO,
        env=env(PYTHONIOENCODING="utf-8"),
        input=piped,
        capture_output=True,
        timeout=LOAD_TIMEOUT,
    )
    out = result.stdout.decode("utf-8", errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "max_new_tokens = 2" in out and "not valid text" in out
    assert "History (0 turns)" in out and "hello" not in out
