"""Shared start-up of the eval/ scripts: make the repository's `qwen` importable, set up logging."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

try:
    import qwen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import qwen  # noqa: F401

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def report(summary: dict, keys: tuple[str, ...]) -> None:
    """Print the headline numbers and where the files are."""
    shown = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
