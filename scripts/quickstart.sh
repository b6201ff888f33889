#!/usr/bin/env bash
# Installs the package on a fresh machine and runs the quickstart offline on a tiny
# random chat checkpoint (pass a real checkpoint path or hub name to use it instead).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# torch first (kept if already installed): a local CPU wheel where this is tested; from PyPI
# on Linux the CUDA build. For CPU only elsewhere, first install it with
# --index-url https://download.pytorch.org/whl/cpu.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[vocab]"
ckpt="${1:-}"
if [ -z "$ckpt" ]; then
    ckpt="${TMPDIR:-/tmp}/qwen-tiny-chat"
    # written once; `python -m qwen tiny` refuses a directory that is not empty (--force overwrites)
    [ -f "$ckpt/model.safetensors" ] || python -m qwen tiny "$ckpt" --chat
fi
python examples/quickstart.py "$ckpt"
