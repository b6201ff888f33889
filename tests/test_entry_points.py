"""Every entry point, tried as a newcomer would: install hints that work from a checkout,
one clear line (the file and the fix, exit status 2) for a checkpoint that is missing,
damaged or half downloaded, and ``python -m qwen tiny`` that keeps what is already there.

The scripts run as subprocesses, all started at once (each imports torch and transformers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

from qwen.__main__ import main as qwen_main
from qwen.demo_utils import ChatSession, CheckpointError, SettingError, check_weights, resolve_checkpoint
from qwen.tiny import make_tiny_checkpoint

TIMEOUT = 300  # seconds: several processes import torch side by side on shared cores


def broken_copy(src: Path, dst: Path, *replace: str) -> Path:
    """``dst``: ``src`` with every file linked except those in ``replace``, which are copied
    (to be broken by the caller)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name in replace:
            shutil.copyfile(path, dst / path.name)
        else:
            (dst / path.name).symlink_to(path)
    return dst


@pytest.fixture(scope="module")
def broken(tiny_chat_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``case: (checkpoint, the file to blame)`` for each way a checkpoint is broken."""
    root = tmp_path_factory.mktemp("broken")
    cases = {"missing": (root / "no-such-checkpoint", root / "no-such-checkpoint")}

    ckpt = broken_copy(tiny_chat_dir, root / "garbage-config", "config.json")
    (ckpt / "config.json").write_text('{"model_type": "qwen", oops')
    cases["garbage config"] = (ckpt, ckpt / "config.json")

    ckpt = broken_copy(tiny_chat_dir, root / "truncated", "model.safetensors")
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "model.safetensors") // 3)
    cases["truncated weights"] = (ckpt, ckpt / "model.safetensors")

    ckpt = broken_copy(tiny_chat_dir, root / "lfs-pointer", "model.safetensors")
    (ckpt / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 38979424\n"
    )
    cases["lfs pointer"] = (ckpt, ckpt / "model.safetensors")
    return cases


SCRIPT_CASES = [
    ("openai_api.py", "missing"),
    ("openai_api.py", "garbage config"),
    ("openai_api.py", "truncated weights"),
    ("openai_api.py", "lfs pointer"),
    ("cli_demo.py", "garbage config"),
    ("cli_demo.py", "truncated weights"),
]


@pytest.fixture(scope="module")
def script_runs(broken):
    """Every (script, case) run at once; ``{(script, case): (returncode, stdout, stderr)}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    procs = {
        (script, case): subprocess.Popen(
            [sys.executable, str(REPO / script), "-c", str(broken[case][0]), "--cpu-only"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, case in SCRIPT_CASES
    }
    results = {}
    for key, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[key] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("script, case", SCRIPT_CASES)
def test_scripts_name_the_broken_file_in_one_line(script, case, broken, script_runs):
    code, out, err = script_runs[(script, case)]
    blamed = str(broken[case][1])
    lines = err.strip().splitlines()
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: ") and blamed in lines[0], err
    assert re.search(r"download it again|git lfs pull|restore it|does not exist", lines[0]), lines[0]


def test_openai_api_missing_packages_hint_works_from_a_checkout(tmp_path):
    """Without the server's packages, the hint is an install that works in a fresh clone."""
    blocker = tmp_path / "uvicorn.py"
    blocker.write_text("raise ModuleNotFoundError('No module named uvicorn', name='uvicorn')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, str(REPO / "openai_api.py"), "-c", "whatever"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "pip install -e '.[serve]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- python -m qwen


def test_convert_and_update_remote_code_name_the_bad_config(broken, tmp_path, capsys):
    ckpt, config = broken["garbage config"]
    assert qwen_main(["convert-qwen2", str(ckpt), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(config) in err and "not valid JSON" in err and "\n" not in err, err

    copy = broken_copy(broken["garbage config"][0], tmp_path / "copy", "config.json", "modeling_qwen.py")
    (copy / "modeling_qwen.py").write_text("# the old official file\n")
    assert qwen_main(["update-remote-code", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(copy / "config.json") in err and "not valid JSON" in err and "\n" not in err, err
    assert (copy / "modeling_qwen.py").read_text() == "# the old official file\n"  # nothing written


def test_update_remote_code_checks_tokenizer_config_before_writing(tiny_chat_dir, tmp_path, capsys):
    copy = broken_copy(tiny_chat_dir, tmp_path / "copy", "tokenizer_config.json", "modeling_qwen.py")
    (copy / "modeling_qwen.py").write_text("# the old official file\n")
    (copy / "tokenizer_config.json").write_text("")
    assert qwen_main(["update-remote-code", str(copy), "--no-backup"]) == 2
    err = capsys.readouterr().err
    assert str(copy / "tokenizer_config.json") in err and "not valid JSON" in err
    assert (copy / "modeling_qwen.py").read_text() == "# the old official file\n"


def test_convert_names_a_truncated_weights_file(broken, tmp_path, capsys):
    ckpt, weights = broken["truncated weights"]
    assert qwen_main(["convert-qwen2", str(ckpt), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(weights) in err and "download it again" in err and "\n" not in err, err


SMALL = dict(layers=1, hidden=8, heads=2, intermediate=16, vocab_size=512)


def test_tiny_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert qwen_main(["tiny", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(out) in err and "--force" in err and "\n" not in err, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # a chat checkpoint is not silently turned into a base one
    make_tiny_checkpoint(tmp_path / "chat", chat=True, **SMALL)
    before = (tmp_path / "chat" / "generation_config.json").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        make_tiny_checkpoint(tmp_path / "chat", **SMALL)
    assert (tmp_path / "chat" / "generation_config.json").read_text() == before

    # --force writes it, and drops weight files that would be loaded instead of the new ones
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert qwen_main(["tiny", str(out), "--force", "--layers", "1", "--hidden", "8", "--heads", "2"]) == 0
    assert not (out / "model.safetensors.index.json").exists() and (out / "notes.txt").read_text() == "mine"
    check_weights(out)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_tiny_files_all_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --------------------------------------------------------------------------- the library's checks


def test_check_weights_names_the_file(broken, tiny_chat_dir, tmp_path):
    check_weights(tiny_chat_dir)  # a whole checkpoint passes
    for case in ("truncated weights", "lfs pointer"):
        ckpt, weights = broken[case]
        with pytest.raises(CheckpointError, match=re.escape(str(weights))):
            check_weights(ckpt)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    (sharded / "model-00001-of-00002.safetensors").symlink_to(tiny_chat_dir / "model.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        check_weights(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no weights"):
        check_weights(empty)


def test_resolve_checkpoint(broken, tiny_chat_dir, tmp_path):
    assert resolve_checkpoint(str(tiny_chat_dir)) == (str(tiny_chat_dir), True)
    assert resolve_checkpoint("Qwen/Qwen-7B-Chat") == ("Qwen/Qwen-7B-Chat", False)  # a hub name
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON \(.* line 1 column"):
        resolve_checkpoint(str(broken["garbage config"][0]))
    bad = broken_copy(tiny_chat_dir, tmp_path / "bad-gen", "generation_config.json")
    (bad / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="generation_config.json holds a JSON list"):
        resolve_checkpoint(str(bad))


class _FakeChatModel:
    """Streams a fixed answer piece by piece; records whether the stream was closed."""

    def __init__(self):
        self.closed = 0

    def chat_stream(self, tokenizer, query, history, system, generation_config):
        try:
            for end in range(1, 4):
                yield "abc"[:end]
        finally:
            self.closed += 1


def test_chat_session_keeps_only_finished_answers():
    from transformers import GenerationConfig

    model = _FakeChatModel()
    chat = ChatSession(model, None, GenerationConfig(max_new_tokens=5), seed=3)
    assert list(chat.stream("hi")) == ["a", "ab", "abc"] and chat.history == [("hi", "abc")]
    stream = chat.stream("again")
    assert next(stream) == "a"
    stream.close()  # stopped midway (Ctrl-C, a closed page): the turn is not kept
    assert chat.history == [("hi", "abc")] and model.closed == 2
    assert chat.configure("max_new_tokens=7 do_sample=false") == {"max_new_tokens": 7, "do_sample": False}
    with pytest.raises(SettingError, match="must be an integer"):
        chat.configure("max_new_tokens=9 top_k=x")
    assert chat.config.max_new_tokens == 7  # all or nothing
    chat.reset_config()
    assert chat.config.max_new_tokens == 5
    with pytest.raises(SettingError, match="0 to 2\\*\\*32-1"):
        chat.set_seed("-1")
    assert chat.set_seed("42") == 42 and chat.clear_history() == 1 and chat.history == []


# --------------------------------------------------------------------------- packaging and hints


def test_distribution_name_and_licence_install_cleanly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    name = project["project"]["name"]
    assert name != "qwen", "the PyPI name 'qwen' belongs to an unrelated project"
    assert project["project"]["license"] == "Apache-2.0"  # SPDX: no setuptools deprecation warning
    requires = " ".join(project["build-system"]["requires"])
    assert re.search(r"setuptools>=(\d+)", requires) and int(re.search(r"setuptools>=(\d+)", requires)[1]) >= 77
    find = project["tool"]["setuptools"]["packages"]["find"]
    assert "qwen.*" in find["include"]  # qwen.serving is part of a (non-editable) install


def test_install_hints_work_from_a_checkout():
    """No hint installs the unrelated PyPI package "qwen" or the unpublished "qwen1" (hints install
    from a checkout), and every extra named exists."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(project["project"]["optional-dependencies"])
    files = [p for pattern in ("*.py", "*.md", "*.sh") for p in REPO.rglob(pattern)]
    files = [p for p in files if not {".git", "build", "dist"} & set(p.relative_to(REPO).parts)]
    files = [p for p in files if ".egg-info" not in str(p) and p.name != "test_entry_points.py"]
    bad, unknown = [], []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            # PyPI's "qwen" is unrelated; this project's distribution "qwen1" is not published
            if re.search(r"pip install(?:\s+-\S+)*\s+['\"]?qwen1?(?:\[|['\"\s]|$)", line):
                bad.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            for extra in re.findall(r"pip install -e ['\"]?\.\[([\w,-]+)\]", line):
                unknown += [f"{path.relative_to(REPO)}:{number}: {e}" for e in extra.split(",") if e not in extras]
    assert not bad, "install hints that fetch PyPI's unrelated 'qwen':\n" + "\n".join(bad)
    assert not unknown, "extras that pyproject.toml does not define:\n" + "\n".join(unknown)
