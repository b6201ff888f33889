#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# torch pinned first, so that the package's bare `torch` requirement is already met
# (where this is tested the pin resolves to a local CPU wheel; see README.md).
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# gptqmodel pulls in torchao, whose builds for torch 2.13 fail to load their compiled parts
# and print warnings at every `import transformers` (gptqmodel imports it only optionally).
python -m pip uninstall --quiet --yes torchao 2>/dev/null || true
# Chromium for tests/test_web_demo.py: Debian's package (Playwright drives it through
# executable_path; Playwright's own browser download is not used). Only where none is installed.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
