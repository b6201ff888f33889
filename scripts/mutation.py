#!/usr/bin/env python
"""Mutation testing with hand-written faults: do the tests catch what they are there for?

Each fault below names a file under ``qwen/``, a snippet of it, the snippet's faulty
replacement and the tests that should catch it. The script copies the working tree to a
scratch directory (the checkout is never modified), then for each fault: writes it, runs its
tests (``pytest -x``), restores the file; finally it reruns, unchanged, each set of tests
that caught a fault (a failure there makes those kills "inconclusive"). A fault whose tests still pass
*survived*: a test is missing, or the fault changes nothing observable (then say so in
``EQUIVALENT``, with the reason).

    python scripts/mutation.py                        # every fault (a long run: not for CI)
    python scripts/mutation.py qwen/serving/app.py    # the faults of some modules
    python scripts/mutation.py --list                 # list them
    python scripts/mutation.py -k forced              # faults whose id contains "forced"

Exit status: 0 when no fault survived (apart from the documented equivalent ones), 1
otherwise, 2 when a snippet no longer matches its module (update the fault list).
Prints one line per fault and a summary; ``--json FILE`` writes the results too.
See docs/testing.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Fault:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: node ids, files, "-k" expressions
    occurrence: int | None = None  # which match of ``original`` (None: it must be unique)


def F(id, file, original, replacement, *tests, occurrence=None) -> Fault:  # noqa: N802 (a table constructor)
    return Fault(id, file, original, replacement, tuple(tests), occurrence)


APP, CONVERT, GEN, CONFIG = (
    "qwen/serving/app.py",
    "qwen/convert.py",
    "qwen/qwen_generation_utils.py",
    "qwen/configuration_qwen.py",
)
CONTRACT = "tests/test_server_contract.py"
OPENAI = "tests/test_openai_api.py"

FAULTS: list[Fault] = [
    # ---------------------------------------------------------------- the serving app
    F(
        "app-failed-generation-is-200-stop",
        APP,
        'pending.cancel()\n                raise APIError(500, update.error, type="server_error", code="generation_failed")',
        'reasons[i] = "stop"\n                continue',
        f"{CONTRACT}::test_failed_generation_is_a_500_in_openai_shape",
    ),
    F(
        "app-chat-stream-error-event-dropped",
        APP,
        'reasons[i] = "error"\n                    yield _json(APIError(500, update.error, type="server_error").body())',
        'reasons[i] = "stop"\n                    yield _json(chat_chunk(request_id, created, self.name, i, {}, "stop"))',
        f"{CONTRACT}::test_failed_generation_streams_an_error_event",
        occurrence=0,
    ),
    F(
        "app-completion-stream-error-event-dropped",
        APP,
        'reasons[i] = "error"\n                    yield _json(APIError(500, update.error, type="server_error").body())',
        'reasons[i] = "stop"',
        f"{CONTRACT}::test_failed_generation_streams_an_error_event",
        occurrence=1,
    ),
    F("app-forced-output-without-hooks", APP, "if not self.test_hooks:", "if False:", CONTRACT, "-k", "forced"),
    F(
        "app-unknown-response-format-accepted",
        APP,
        '        raise _bad(\n            f"response_format type {kind!r}',
        '        return None\n        raise _bad(\n            f"response_format type {kind!r}',
        CONTRACT,
        "-k",
        "documented_400s",
    ),
    F(
        "app-best-of-accepted",
        APP,
        "body.best_of is not None and body.best_of != body.n",
        "body.best_of is not None and body.best_of > body.n + 1",
        CONTRACT,
        "-k",
        "documented_400s or refusals_leave",
    ),
    F(
        "app-suffix-accepted",
        APP,
        "if body.suffix:  # an empty suffix asks for nothing",
        "if body.suffix is None and False:",
        CONTRACT,
        "-k",
        "documented_400s",
    ),
    F(
        "app-empty-suffix-refused",
        APP,
        "if body.suffix:  # an empty suffix asks for nothing",
        "if body.suffix is not None:",
        CONTRACT,
        "-k",
        "refusals_leave",
    ),
    F(
        "app-one-stop-string-too-many",
        APP,
        "if len(stop) > MAX_STOP_STRINGS:",
        "if len(stop) > MAX_STOP_STRINGS + 1:",
        CONTRACT,
        "-k",
        "documented_400s",
    ),
    F(
        "app-empty-prompt-list-accepted",
        APP,
        'if not prompt:\n            raise _bad("prompt must not be empty", param="prompt")',
        "pass",
        CONTRACT,
        "-k",
        "documented_400s",
    ),
    F(
        "app-empty-string-prompt-accepted",
        APP,
        "            if not ids:\n",
        "            if False:\n",
        CONTRACT,
        "-k",
        "documented_400s",
    ),
    F(
        "app-max-length-equal-to-prompt-accepted",
        APP,
        "if legacy <= prompt_tokens:",
        "if legacy < prompt_tokens:",
        f"{CONTRACT}::test_max_length_must_leave_room_for_a_completion",
    ),
    F(
        "app-base-checkpoint-chats",
        APP,
        'getattr(self.generation_config, "chat_format", "chatml") != "chatml"',
        "False",
        f"{CONTRACT}::test_base_checkpoint_refuses_chat",
    ),
    F(
        "app-catch-all-500-shape",
        APP,
        'f"internal error: {type(error).__name__}: {error}", type="server_error"',
        'f"internal error: {error}", type="internal_error"',
        f"{CONTRACT}::test_unexpected_errors_are_a_500_in_openai_shape",
    ),
    F(
        "app-served-model-name-ignored",
        APP,
        "return ModelCard(id=self.name,",
        'return ModelCard(id="qwen",',
        f"{CONTRACT}::test_served_model_name",
    ),
    F(
        "app-default-max-tokens-one-short",
        APP,
        "room = limit - prompt_tokens",
        "room = limit - prompt_tokens - 1",
        f"{CONTRACT}::test_max_model_len",
    ),
    F(
        "app-presence-penalty-dropped",
        APP,
        "presence_penalty=body.presence_penalty or 0.0,",
        "presence_penalty=0.0,",
        CONTRACT,
        "-k",
        "penalties",
    ),
    F(
        "app-frequency-penalty-dropped",
        APP,
        "frequency_penalty=body.frequency_penalty or 0.0,",
        "frequency_penalty=0.0,",
        CONTRACT,
        "-k",
        "penalties",
    ),
    F(
        "app-penalties-swapped",
        APP,
        "presence_penalty=body.presence_penalty or 0.0,\n            frequency_penalty=body.frequency_penalty or 0.0,",
        "presence_penalty=body.frequency_penalty or 0.0,\n            frequency_penalty=body.presence_penalty or 0.0,",
        CONTRACT,
        "-k",
        "penalties",
    ),
    F(
        "app-seed-same-for-every-choice",
        APP,
        "seed=None if body.seed is None else body.seed + index,",
        "seed=body.seed,",
        f"{OPENAI}::test_n_and_seed",
    ),
    F(
        "app-429-without-retry-after",
        APP,
        'headers={"Retry-After": "1"}',
        "headers=None",
        f"{OPENAI}::test_queue_full_gives_429",
    ),
    # ---------------------------------------------------------------- the Qwen2 export
    F(
        "convert-window-size-exported",
        CONVERT,
        'if cfg.get("window_size") is not None:',
        "if False:",
        "tests/test_convert.py",
        "-k",
        "refuses_inexact or config_dict_refuses",
    ),
    F(
        "convert-gate-up-swapped",
        CONVERT,
        '"mlp.w2.weight": "mlp.gate_proj.weight",\n    "mlp.w1.weight": "mlp.up_proj.weight",',
        '"mlp.w2.weight": "mlp.up_proj.weight",\n    "mlp.w1.weight": "mlp.gate_proj.weight",',
        "tests/test_convert.py::test_every_source_format_gives_the_same_export",
    ),
    F(
        "convert-q-k-swapped",
        CONVERT,
        '("q_proj", "k_proj", "v_proj")',
        '("k_proj", "q_proj", "v_proj")',
        "tests/test_convert.py::test_every_source_format_gives_the_same_export",
        occurrence=0,
    ),
    F(
        "convert-mlp-width-not-halved",
        CONVERT,
        '"intermediate_size": int(cfg["intermediate_size"]) // 2,',
        '"intermediate_size": int(cfg["intermediate_size"]),',
        "tests/test_convert.py",
        "-k",
        "config_reads_back or first_release",
    ),
    F(
        "convert-chat-eos-is-endoftext",
        CONVERT,
        '"eos_token_id": IM_END_ID if chat else EOD_ID,',
        '"eos_token_id": EOD_ID,',
        "tests/test_convert.py",
        "-k",
        "chat_export_stops",
    ),
    F(
        "convert-rope-base-default",
        CONVERT,
        'theta = float(cfg.get("rotary_emb_base", 10000))',
        "theta = 10000.0",
        "tests/test_convert.py::test_every_source_format_gives_the_same_export",
    ),
    F(
        "convert-untied",
        CONVERT,
        '"tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),',
        '"tie_word_embeddings": False,',
        "tests/test_convert.py::test_every_source_format_gives_the_same_export",
    ),
    F(
        "convert-dynamic-scaling-grows-from-max-position",
        CONVERT,
        "        position = seq_length\n",
        "        position = max_position\n",
        "tests/test_convert.py",
        "-k",
        "dynamic_scaling or rope_scaling",
    ),
    F(
        "convert-partial-rotary-exported",
        CONVERT,
        'if float(cfg.get("rotary_pct", 1.0)) != 1.0:',
        'if float(cfg.get("rotary_pct", 1.0)) < 0.5:',
        "tests/test_convert.py",
        "-k",
        "refuses_inexact",
    ),
    F(
        "convert-head-dim-check-dropped",
        CONVERT,
        "if kv_channels * heads != hidden:",
        "if False:",
        "tests/test_convert.py",
        "-k",
        "refuses_inexact or config_dict_refuses",
    ),
    # ---------------------------------------------------------------- chat helpers
    F(
        "gen-batch-row-drops-its-stop-word",
        GEN,
        "            return generated[: index + 1]\n    return generated",
        "            return generated[:index]\n    return generated",
        "tests/test_faults_chat.py",
        "tests/test_chat.py",
        "-k",
        "chat_batch",
    ),
    F(
        "gen-batch-row-ignores-multi-token-stops",
        GEN,
        "len(word) <= end and sequence[end - len(word) : end] == word for word in stop",
        "len(word) == 1 and sequence[end - 1 : end] == word for word in stop",
        "tests/test_faults_chat.py",
    ),
    F(
        "gen-config-stop-words-ignored",
        GEN,
        'stop += _normalize_stop_words(getattr(generation_config, "stop_words_ids", None) or [])',
        "pass",
        "tests/test_faults_chat.py",
        "tests/test_chat.py",
    ),
    F(
        "gen-chatml-stops-miss-im-start",
        GEN,
        "return [[tokenizer.im_end_id], [tokenizer.im_start_id]]",
        "return [[tokenizer.im_end_id]]",
        "tests/test_chat.py",
    ),
    F(
        "gen-decode-cut-misses-im-start",
        GEN,
        "return frozenset((tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id))",
        "return frozenset((tokenizer.im_end_id, tokenizer.eod_id))",
        "tests/test_chat.py",
    ),
    F(
        "gen-decode-not-stripped",
        GEN,
        "text = tokenizer.decode(kept, errors=errors).strip()",
        "text = tokenizer.decode(kept, errors=errors)",
        "tests/test_chat.py",
    ),
    F(
        "gen-stop-criteria-any-token",
        GEN,
        "done |= (input_ids[:, -len(word) :] == target).all(dim=-1)",
        "done |= (input_ids[:, -len(word) :] == target).any(dim=-1)",
        "tests/test_chat.py",
        "tests/test_faults_chat.py",
    ),
    F(
        "gen-logits-processor-does-not-force",
        GEN,
        '            scores[stopped] = float("-inf")\n',
        "",
        "tests/test_chat.py",
    ),
    F(
        "gen-stream-shows-partial-characters",
        GEN,
        'text = text.rstrip("\\ufffd")',
        "pass",
        "tests/test_chat.py",
    ),
    F(
        "gen-max-window-size-from-config-ignored",
        GEN,
        'max_window_size = getattr(generation_config, "max_window_size", None)',
        "max_window_size = None",
        "tests/test_chat.py",
    ),
    F(
        "gen-greedy-keeps-sampling-fields",
        GEN,
        "if config.do_sample is False:\n        for name",
        "if False:\n        for name",
        "tests/test_chat.py",
    ),
    F(
        "gen-batch-pads-with-eod",
        GEN,
        '    if isinstance(pad_id, int) and pad_id != getattr(tokenizer, "unk_token_id", None):\n        return pad_id\n',
        "",
        "tests/test_chat.py",
        "tests/test_faults_chat.py",
    ),
    # ---------------------------------------------------------------- the configuration
    F(
        "config-window-list-reversed",
        CONFIG,
        "            windows = list(w)\n",
        "            windows = list(w)[::-1]\n",
        "tests/test_model.py",
        "-k",
        "window",
    ),
    F(
        "config-window-int-ignored",
        CONFIG,
        "windows = [w] * self.num_hidden_layers",
        "windows = [None] * self.num_hidden_layers",
        "tests/test_model.py",
        "-k",
        "window",
    ),
    F(
        "config-window-zero-accepted",
        CONFIG,
        "or not isinstance(v, int) or v < 1):",
        "or not isinstance(v, int) or v < 0):",
        "tests/test_loading.py",
        "tests/test_model.py",
        "-k",
        "inconsistent or window",
    ),
    F(
        "config-flags-truthy",
        CONFIG,
        "if not (isinstance(getattr(self, key), int) and getattr(self, key) in (0, 1)):",
        "if False:",
        "tests/test_loading.py",
        "-k",
        "config or legacy or precision",
    ),
    F(
        "config-two-precision-flags-accepted",
        CONFIG,
        "if len(flags) > 1:",
        "if len(flags) > 2:",
        "tests/test_loading.py",
        "-k",
        "config or legacy or precision",
    ),
    F(
        "config-legacy-n-embd-misread",
        CONFIG,
        '"n_embd": "hidden_size",',
        '"n_embd": "intermediate_size",',
        "tests/test_loading.py",
        "-k",
        "legacy",
    ),
    F(
        "config-padded-vocab-must-agree",
        CONFIG,
        'if new != "vocab_size" and current != DEFAULTS[new] and current != value:',
        "if current != DEFAULTS[new] and current != value:",
        "tests/test_faults_config.py",
        "tests/test_loading.py",
        "tests/test_convert.py",
        "-k",
        "legacy or first_release",
    ),
    F(
        "config-params-dtype-always-bf16",
        CONFIG,
        "flag == _PARAMS_DTYPE[str(params_dtype)]",
        'flag == "bf16"',
        "tests/test_loading.py",
        "-k",
        "config or legacy or precision",
    ),
    F(
        "config-odd-rotary-width-accepted",
        CONFIG,
        "if rot % 2 or rot < 2:",
        "if rot < 2:",
        "tests/test_faults_config.py",
        "tests/test_loading.py",
        "-k",
        "config or legacy or precision",
    ),
    F(
        "config-odd-intermediate-accepted",
        CONFIG,
        "if self.intermediate_size <= 0 or self.intermediate_size % 2:",
        "if self.intermediate_size <= 0:",
        "tests/test_loading.py",
        "-k",
        "config or legacy or precision",
    ),
    F(
        "config-tied-by-default",
        CONFIG,
        'kwargs.setdefault("tie_word_embeddings", False)',
        'kwargs.setdefault("tie_word_embeddings", True)',
        "tests/test_faults_config.py",
        "tests/test_loading.py",
        "tests/test_model.py",
        "-k",
        "config or state_dict or official",
    ),
]

# Faults that change nothing a test could observe, with the reason (kept out of the
# survivor count). Add one only with an argument that no behaviour differs.
EQUIVALENT: dict[str, str] = {
    "gen-batch-pads-with-eod": (
        "chat_batch's padding id is masked out of attention and never decoded: <|extra_0|> (the official "
        "choice) and <|endoftext|> give the same responses; only the token in the padded input differs"
    ),
}


def _copy_tree(dst: Path) -> None:
    """The working tree as it is now (tracked and untracked files, not ignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _apply(text: str, fault: Fault) -> str:
    count = text.count(fault.original)
    if fault.occurrence is None:
        if count != 1:
            raise LookupError(f"{fault.id}: the snippet occurs {count} times in {fault.file} (expected once)")
        return text.replace(fault.original, fault.replacement)
    if count <= fault.occurrence:
        raise LookupError(f"{fault.id}: the snippet occurs {count} times in {fault.file}")
    start = -1
    for _ in range(fault.occurrence + 1):
        start = text.index(fault.original, start + 1)
    return text[:start] + fault.replacement + text[start + len(fault.original) :]


def _pytest(tree: Path, args: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *args]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, (lines[-1] if lines else done.stderr[-300:]), time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="only the faults of these files (e.g. qwen/convert.py)")
    parser.add_argument("-k", dest="keyword", help="only faults whose id contains this (several: comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--check", action="store_true", help="check that every snippet matches, and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    faults = [f for f in FAULTS if (not args.modules or f.file in args.modules)]
    keywords = [k for k in (args.keyword or "").split(",") if k]
    faults = [f for f in faults if not keywords or any(k in f.id for k in keywords)]
    if args.list:
        for fault in faults:
            print(f"{fault.id:50s} {fault.file:32s} {' '.join(fault.tests)}")
        return 0
    if not faults:
        parser.error("no fault matches")

    with tempfile.TemporaryDirectory(prefix="qwen-mutation-") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        originals = {f.file: (tree / f.file).read_text() for f in faults}
        for fault in faults:  # every snippet must still match before anything runs
            try:
                _apply(originals[fault.file], fault)
            except LookupError as error:
                print(f"error: {error}; update scripts/mutation.py", file=sys.stderr)
                return 2
        if args.check:
            print(f"{len(faults)} faults, every snippet matches")
            return 0
        results = []
        for fault in faults:
            path = tree / fault.file
            path.write_text(_apply(originals[fault.file], fault))
            try:
                rc, last, seconds = _pytest(tree, fault.tests, args.timeout)
            finally:
                path.write_text(originals[fault.file])
            status = "killed" if rc != 0 else "equivalent" if fault.id in EQUIVALENT else "SURVIVED"
            results.append(
                {"id": fault.id, "file": fault.file, "status": status, "seconds": round(seconds), "last": last}
            )
            print(f"{status:10s} {seconds:6.0f}s  {fault.id}: {last}", flush=True)

        if not args.no_baseline:  # a kill counts only if the same tests pass without the fault
            killers = dict.fromkeys(f.tests for f, r in zip(faults, results, strict=True) if r["status"] == "killed")
            for tests in killers:
                rc, last, seconds = _pytest(tree, tests, args.timeout)
                print(f"baseline {'ok' if rc == 0 else 'FAILED':6s} {seconds:6.0f}s  {' '.join(tests)}: {last}")
                if rc != 0:
                    for f, r in zip(faults, results, strict=True):
                        if f.tests == tests and r["status"] == "killed":
                            r["status"] = "inconclusive"

    survivors = [r for r in results if r["status"] in ("SURVIVED", "inconclusive")]
    print(f"\n{len(results)} faults: {sum(r['status'] == 'killed' for r in results)} killed, "
          f"{sum(r['status'] == 'equivalent' for r in results)} equivalent, {len(survivors)} survived")  # fmt: skip
    for r in results:
        if r["status"] == "equivalent":
            print(f"  equivalent {r['id']}: {EQUIVALENT[r['id']]}")
    for r in survivors:
        print(f"  {r['status']} {r['id']} ({r['file']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
