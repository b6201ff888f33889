"""The benchmarks' ``--baseline DIR``: a run for the baseline imports DIR's ``qwen``.

Only the plumbing is tested (which package a run imports, how the ratios are formed);
speed belongs to the benchmarks themselves.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_baseline_worker_imports_the_baseline_package(tmp_path, tiny_dir, monkeypatch):
    """A ``-baseline`` run takes ``qwen`` from DIR (here a copy of this package), ahead of the
    installed one, and decodes what this checkout decodes."""
    decode = _load("decode")
    baseline = tmp_path / "baseline"
    shutil.copytree(REPO / "qwen", baseline / "qwen", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("QWEN_CPU_KERNELS", "0")  # no kernel build for the copy: only the import is at stake
    args = Namespace(ckpt=tiny_dir, prompt=4, new_tokens=2, threads=1, interleaved_steps=0)

    line = decode.run_in_process("qwen-baseline", args, baseline=baseline)

    assert line["contender"] == "qwen-baseline"
    assert Path(line["qwen_file"]) == baseline / "qwen" / "__init__.py"
    assert line["new_tokens"] == 2
    with pytest.raises(ValueError, match="baseline"):
        decode.run_in_process("qwen-baseline", args, baseline=None)


def test_decode_baseline_ratios():
    decode = _load("decode")
    summary = {
        "qwen_decode_tok_s": 30.0,
        "qwen_baseline_decode_tok_s": 20.0,
        "qwen_ttft_s": 0.5,
        "qwen_baseline_ttft_s": 1.0,
        "qwen_interleaved_decode_vs_bound": 0.9,
        "qwen_interleaved_baseline_decode_vs_bound": 0.75,
        "qwen2_decode_tok_s": 10.0,
    }
    results = {
        "qwen": [{"decode_tok_s": 30.0, "tokens": [1, 2]}, {"decode_tok_s": 33.0, "tokens": [1, 2]}],
        "qwen-baseline": [{"decode_tok_s": 20.0, "tokens": [1, 2]}, {"decode_tok_s": 30.0, "tokens": [1, 3]}],
    }
    assert decode.baseline_ratios(summary, results) == {
        "qwen_ttft_s_vs_baseline": 0.5,
        "qwen_decode_tok_s_vs_baseline": 1.5,
        "qwen_decode_tok_s_vs_baseline_per_round": [1.5, 1.1],
        "qwen_same_greedy_tokens_as_baseline": False,
        "qwen_interleaved_decode_vs_bound_vs_baseline": 1.2,
    }


def test_serve_load_server_boot_runs_the_checkouts_script_with_its_package(tmp_path):
    """The server of a checkout runs its openai_api.py as ``__main__`` with its arguments,
    after importing that checkout's ``qwen`` and printing where from."""
    serve_load = _load("serve_load")
    checkout = tmp_path / "checkout"
    (checkout / "qwen").mkdir(parents=True)
    (checkout / "qwen" / "__init__.py").write_text("")
    (checkout / "openai_api.py").write_text(
        "import sys\nimport qwen\nprint('ran', __name__, sys.argv[1:], qwen.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", serve_load.SERVER_BOOT, str(checkout / "openai_api.py"), "-c", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    init = checkout / "qwen" / "__init__.py"
    assert out == [f"qwen_file={init}", f"ran __main__ ['-c', 'x'] {init}"]


def test_serve_load_baseline_ratios():
    serve_load = _load("serve_load")
    configs = [
        {"config": "batched", "dtype": "bf16", "max_batch_size": 4},
        {"config": "batched-baseline", "dtype": "bf16", "max_batch_size": 4},
    ]
    row = {"dtype": "bf16", "clients": 2, "ttft_p50_s": 0.5, "ttft_p95_s": 1.0}
    results = [
        {**row, "config": "batched", "round": 0, "tok_s": 12.0},
        {**row, "config": "batched-baseline", "round": 0, "tok_s": 10.0},
        {**row, "config": "batched-baseline", "round": 1, "tok_s": 10.0},
        {**row, "config": "batched", "round": 1, "tok_s": 8.0},
        {**row, "config": "batched", "round": 0, "tok_s": 99.0, "clients": 4},
    ]
    assert serve_load.baseline_ratios(results, configs, 2) == {
        "batched:bf16_vs_baseline": {"tok_s": 1.0, "ttft_p50_s": 1.0, "ttft_p95_s": 1.0, "tok_s_per_round": [1.2, 0.8]}
    }
