"""Shared fixtures: tiny random checkpoints written by ``python -m qwen tiny``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The C kernels need a C compiler. Decided from the environment, never from the code under
# test: CI machines have one, so there a missing compiler fails the kernel tests instead
# of skipping them.
_HAS_COMPILER = any(shutil.which(name) for name in (os.environ.get("CC") or "cc", "gcc", "clang"))
needs_compiler = pytest.mark.skipif(
    not os.environ.get("CI")
    and (not _HAS_COMPILER or os.environ.get("QWEN_CPU_KERNELS", "1") in ("0", "false", "no", "off")),
    reason="no C compiler on PATH (or QWEN_CPU_KERNELS=0)",
)


def make_tiny(out: Path, *args: str) -> Path:
    """Run the project's own command, as users do, and return the directory."""
    subprocess.run(
        [sys.executable, "-m", "qwen", "tiny", str(out), *args],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return out


def rand_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random token ids below the special tokens, reproducible by ``seed``."""
    return torch.randint(0, 151643, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Base model, trained context 64 tokens (short, so NTK/logN are reachable)."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "--seq-length", "64")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """Chat model (chat_format chatml), trained context 8192."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-chat", "--chat")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_kernel():
    """Forget the process's CPU kernel before and after the test (its environment differs)."""
    from qwen import cpu_kernels

    cpu_kernels._kernel.cache_clear()
    yield
    cpu_kernels._kernel.cache_clear()


# --------------------------------------------------------------------------- expected skips
#
# Under CI (the CI environment variable set, as GitHub Actions and most CI services do) a
# skipped test fails the run unless its reason matches one of the patterns below: the test
# extras install every package the tests use and CI machines have a C compiler, so there a
# missing piece is a broken environment, not a reason to skip. Outside CI unexpected skips
# are listed at the end of the run and change nothing.
#
# To add a skip that is legitimately expected (hardware, operating system, a check that runs
# elsewhere), add its reason here: a regular expression searched in the skip's reason, and
# why the skip is acceptable. Never add a reason for a package or tool that the test extra
# installs.
EXPECTED_SKIPS: dict[str, str] = {
    r"runs in a child pytest with TRITON_INTERPRET=1": (
        "the Triton kernel tests run in a child pytest (test_kv_cache.py::test_triton_kernels_in_interpreter), "
        "because the interpreter must be chosen before triton is first imported"
    ),
    r"this session runs the kernel tests itself \(TRITON_INTERPRET=1\)": (
        "the launcher of that child pytest, in a session that already runs in the interpreter"
    ),
    r"the kernels can run here \(TRITON_INTERPRET=1\)": (
        "the CPU-notice test of use_cache_kernel=True, where the kernels do run (inside the child pytest)"
    ),
    r"CPU bf16 matmuls are not native here": "hardware: packing pays off only with AVX512-BF16/AMX",
    r"needs Linux transparent huge pages": "operating system: THP disabled or not Linux",
    r"needs Linux /proc/self/smaps": "operating system: not Linux",
}


def in_ci() -> bool:
    """True where the CI environment variable is set to anything but false/0/no/off."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


_SKIPS: list[tuple[str, str]] = []  # (test id, reason) of every skip this session


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def unexpected_skips(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ``(test id, reason)`` pairs whose reason matches no pattern of EXPECTED_SKIPS."""
    return [(node, reason) for node, reason in skips if not any(re.search(p, reason) for p in EXPECTED_SKIPS)]


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (pytest.importorskip, allow_module_level)
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if in_ci() and unexpected_skips(_SKIPS) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    unexpected = unexpected_skips(_SKIPS)
    if not unexpected:
        return
    verdict = "they fail this CI run" if in_ci() else "under CI=true they would fail the run"
    terminalreporter.section("unexpected skips", sep="=", red=in_ci(), yellow=not in_ci())
    terminalreporter.line(
        f"{len(unexpected)} skipped test(s) have a reason not listed in tests/conftest.py EXPECTED_SKIPS; {verdict}:"
    )
    for node, reason in unexpected:
        terminalreporter.line(f"  {node}: {reason}")
