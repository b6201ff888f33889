"""Shared fixtures: tiny random checkpoints written by ``python -m qwen tiny``."""

from __future__ import annotations

import os
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
