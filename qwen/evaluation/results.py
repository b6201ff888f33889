"""Result files: a JSON-lines record per sample (resumable) and a JSON summary."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class SettingsMismatchError(RuntimeError):
    """An output directory holds results made with other settings."""


class ResultStore:
    """``{out_dir}/{task}_samples.jsonl`` (one record per finished sample, appended as it
    finishes) and ``{out_dir}/{task}_summary.json``. A rerun with the same settings skips
    the samples already recorded; other settings raise unless ``overwrite``."""

    def __init__(self, out_dir: str | Path, task: str, settings: Mapping[str, Any], overwrite: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.samples_path = self.dir / f"{task}_samples.jsonl"
        self.summary_path = self.dir / f"{task}_summary.json"
        self.settings_path = self.dir / f"{task}_settings.json"
        self.settings = dict(settings)
        self.records: dict[str, dict] = {}
        if overwrite:
            for path in (self.samples_path, self.summary_path, self.settings_path):
                path.unlink(missing_ok=True)
        if self.settings_path.exists():
            previous = json.loads(self.settings_path.read_text())
            if previous != json.loads(json.dumps(self.settings)):
                raise SettingsMismatchError(
                    f"{self.dir} holds {task} results made with other settings ({self.settings_path}); "
                    "use another output directory or --overwrite"
                )
        self.settings_path.write_text(json.dumps(self.settings, indent=2, ensure_ascii=False) + "\n")
        if self.samples_path.exists():
            with open(self.samples_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:  # a line cut off by an interrupted run
                            continue
                        self.records[record["key"]] = record
            if self.records:
                logger.info("resuming: %d samples already in %s", len(self.records), self.samples_path)

    def done(self, key: str) -> bool:
        return key in self.records

    def add(self, records: Iterable[dict]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for record in records:
                self.records[record["key"]] = record
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> dict:
        summary = {"task": self.task, "settings": self.settings, **summary}
        self.summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return summary


def accuracy_summary(
    records: Iterable[Mapping[str, Any]],
    categories: Mapping[str, str] | None = None,
    macro_average: bool = False,
    hard: Iterable[str] = (),
    correct_field: str = "correct",
) -> dict:
    """Per-subject accuracy (%), per-category and overall: ``overall`` is the original's
    figure (mean over subjects if ``macro_average``, else over questions); both
    ``micro_average`` and ``macro_average`` are given."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_subject[record.get("subject", "all")].append(bool(record[correct_field]))
    subjects = {s: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items()) if v}
    n = sum(s["n"] for s in subjects.values())
    micro = 100.0 * sum(sum(v) for v in by_subject.values()) / n if n else 0.0
    macro = sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0
    summary: dict[str, Any] = {
        "overall": macro if macro_average else micro,
        "micro_average": micro,
        "macro_average": macro,
        "n": n,
        "subjects": subjects,
    }
    if categories:
        grouped: dict[str, list[str]] = defaultdict(list)
        for subject in subjects:
            grouped[categories.get(subject, "Unknown")].append(subject)
        summary["categories"] = {}
        for category, names in sorted(grouped.items()):
            if macro_average:
                value = sum(subjects[s]["accuracy"] for s in names) / len(names)
            else:
                value = 100.0 * sum(sum(by_subject[s]) for s in names) / sum(subjects[s]["n"] for s in names)
            summary["categories"][category] = value
    hard = [s for s in hard if s in subjects]
    if hard:
        summary["hard"] = sum(subjects[s]["accuracy"] for s in hard) / len(hard)
    return summary
