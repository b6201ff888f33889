#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# The CPU build of torch first: a bare `torch` requirement would pull a CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
