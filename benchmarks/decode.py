"""Prefill/decode speed and memory on a Qwen-1.8B-shaped random bf16 checkpoint (CPU).

Runs, alternating, in fresh processes (every model run between two probe runs):
  * ``qwen``   this package's ``QWenLMHeadModel`` on the official-layout checkpoint;
  * ``qwen-compiled``  the same, decoding with compiled steps: ``generate(...,
               cache_implementation="static", compile_config=CompileConfig())`` (after
               one untimed ``generate`` that compiles them);
  * ``qwen2``  ``transformers.Qwen2ForCausalLM`` on the same weights in the Qwen2 layout;
  * ``probe``  the fastest bf16 GEMV on offer here (one-row ``F.linear``, with and
               without oneDNN, in 4 KiB and in huge pages, and this package's C
               kernel) over a matrix the size
               of ``lm_head`` -> memory bandwidth, and from it the decode bound
               ``bandwidth / bytes read per token``;
then, once each, ``interleaved`` and ``interleaved-compiled``: this package's decode steps
(eager; compiled) each followed by the probe's GEMV in one process (a ratio to the bound
that drift between processes does not move).
Each prints one JSON line; the last line is a summary of medians.

With ``--baseline DIR`` (another checkout of this repository, e.g. the previous commit:
``mkdir DIR && git archive HEAD~1 | tar -x -C DIR``) every run of this package is also made with the
``qwen`` package of DIR (``PYTHONPATH=DIR``) as ``qwen-baseline``,
``qwen-compiled-baseline``, ``interleaved-baseline`` and ``interleaved-compiled-baseline``,
each right beside its counterpart on this checkout (whose workers get this checkout first
on ``PYTHONPATH``); every line records the ``qwen.__file__`` its process imported, and the
summary adds the ratios current/baseline (``*_vs_baseline``).

    python benchmarks/decode.py --rounds 3
    python benchmarks/decode.py --rounds 3 --baseline /tmp/baseline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(layers=24, hidden=2048, heads=16, intermediate=11008, vocab_size=151936, seq_length=8192)
ENDOFTEXT = 151643
CONTENDERS = ("qwen", "qwen-compiled", "qwen2")
INTERLEAVED = ("interleaved", "interleaved-compiled")
BASELINE = "-baseline"  # suffix of a run with the baseline checkout's package
WITH_BASELINE = ("qwen", "qwen-compiled", *INTERLEAVED)  # the runs that import this package
DEFAULT_DIR = Path(os.environ.get("QWEN_BENCH_DIR", Path.home() / ".cache" / "qwen-bench")) / "qwen-1.8b-random"


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def ensure_checkpoints(ckpt: Path) -> tuple[Path, Path]:
    """The random official-layout checkpoint and its Qwen2-layout twin (made once)."""
    from qwen.tiny import make_tiny_checkpoint

    if not (ckpt / "model.safetensors").exists():
        print(f"writing a random Qwen-1.8B-shaped checkpoint to {ckpt} ...", file=sys.stderr)
        make_tiny_checkpoint(ckpt, chat=True, dtype="bf16", init_std=0.02, **SHAPE)
    twin = ckpt.with_name(ckpt.name + "-qwen2")
    if not (twin / "model.safetensors").exists():
        from safetensors import safe_open
        from safetensors.torch import save_file

        from qwen.convert import qwen2_config_dict, qwen2_tensors

        twin.mkdir(parents=True, exist_ok=True)
        out = {}
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            for name in f.keys():
                out.update(qwen2_tensors(name, f.get_tensor(name)))
        save_file(out, str(twin / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((ckpt / "config.json").read_text())
        (twin / "config.json").write_text(json.dumps(qwen2_config_dict(cfg), indent=2))
    return ckpt, twin


def timed_generate(model, ids, **generate_kwargs) -> tuple:
    """Greedy ``model.generate(ids)`` with a clock on every streamed token.

    Returns (sequences, time to first token in s, decode tokens/s or None for one token).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=clock, **generate_kwargs
        )
    # put() #0 is the prompt, #1 the first new token, then one per decoded token.
    ttft = clock.times[1] - start
    decode = (len(clock.times) - 2) / (clock.times[-1] - clock.times[1]) if len(clock.times) > 2 else None
    return out, ttft, decode


class BanToken:
    """Logits processor that rules out one token (``scores[:, token] = -inf``)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = float("-inf")
        return scores


def run_model(which: str, path: Path, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    if which.startswith("qwen-") or which == "qwen":
        import qwen  # noqa: F401  (registers model_type "qwen")

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_gib()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    ids = torch.randint(0, ENDOFTEXT, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    # Plain greedy decoding, the same for every contender: no repetition penalty (the
    # chat checkpoint's generation_config asks for 1.1, Qwen2's has none), and the length
    # forced by ruling out end-of-text with an O(1) processor; ``min_new_tokens`` would do
    # it by scanning the whole 151936-token vocabulary every step (about 1.3 ms a token
    # here, a cost of the harness rather than of the model).
    kwargs = dict(
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        logits_processor=LogitsProcessorList([BanToken(ENDOFTEXT)]),
        pad_token_id=ENDOFTEXT,
    )
    compile_s = None
    if which == "qwen-compiled":
        from transformers.generation import CompileConfig

        kwargs.update(cache_implementation="static", compile_config=CompileConfig())
        t0 = time.perf_counter()
        timed_generate(model, ids, **kwargs)  # compiles the decoding step
        compile_s = round(time.perf_counter() - t0, 2)
    out, ttft, decode = timed_generate(model, ids, **kwargs)
    return {
        "contender": which,
        "load_s": round(load_s, 2),
        "first_generate_s": compile_s,
        "ttft_s": round(ttft, 3),
        "decode_tok_s": round(decode, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "rss_after_load_gib": round(rss_loaded, 3),
        "weights_gib": round(weights_gib, 3),
        "new_tokens": int(out.shape[1] - prompt_len),
        "tokens": out[0, prompt_len:].tolist()[:8],
    }


def bytes_per_token(layers: int, hidden: int, intermediate_size: int, vocab: int) -> int:
    """Bytes of bf16 weights one decode step reads: every weight but the embedding table
    (one row of it)."""
    inter = intermediate_size // 2
    per_layer = 4 * hidden * hidden + 3 * hidden + 3 * hidden * inter + 2 * hidden
    return 2 * (layers * per_layer + hidden + vocab * hidden)


def kernel_gemv(x, matrix):
    """The probe's GEMV through this package's C kernel (:func:`qwen.cpu_kernels.linear_row`,
    what its bf16 decoding steps use; only where ``cpu_kernels.available()``): the probe
    takes the fastest GEMV on offer, so the bound never rests on a slower kernel than the
    model's own."""
    import torch

    from qwen.cpu_kernels import linear_row

    with torch.inference_mode():
        return linear_row(x, matrix, None)


def probe_matrices(rows: int, cols: int) -> list:
    """The probe's random bf16 matrix, and the same in memory advised for transparent huge
    pages where this machine has them (this package loads its weights there)."""
    import torch

    try:
        from qwen.cpu_memory import _transparent_huge_pages, huge_page_empty_like
    except ImportError:  # a checkout from before the CPU engine left the model file (--baseline)
        from qwen.modeling_qwen import _transparent_huge_pages, huge_page_empty_like

    w = torch.randn(rows, cols).to(torch.bfloat16)
    return [w, huge_page_empty_like(w).copy_(w)] if _transparent_huge_pages() else [w]


def run_probe(path: Path) -> dict:
    """The fastest bf16 GEMV on offer here, over a matrix the size of ``lm_head``.

    Up to four forms, best taken: a one-row ``F.linear`` as torch dispatches it (oneDNN
    on CPUs with native bf16) and the same with oneDNN switched off (torch's own GEMV
    kernel), over the matrix in torch's own memory (4 KiB pages); the latter over the
    matrix in huge pages (:func:`probe_matrices`); and this package's C kernel
    (:func:`kernel_gemv`) over the same.
    """
    import torch
    import torch.nn.functional as F

    from qwen import cpu_kernels

    cfg = json.loads((path / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    matrices = probe_matrices(v, h)
    x = torch.randn(1, h).to(torch.bfloat16)

    def gb_s(matrix, gemv=F.linear) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(3):
                gemv(x, matrix)
            for _ in range(15):
                t = time.perf_counter()
                gemv(x, matrix)
                times.append(time.perf_counter() - t)
        return matrix.numel() * 2 / statistics.median(times) / 1e9

    default = gb_s(matrices[0])
    with torch.backends.mkldnn.flags(enabled=False):
        no_onednn = gb_s(matrices[0])
        huge_no_onednn = gb_s(matrices[1]) if len(matrices) > 1 else None
    kernel = gb_s(matrices[-1], kernel_gemv) if cpu_kernels.available() else None
    gbs = max(default, no_onednn, huge_no_onednn or 0.0, kernel or 0.0)
    read = bytes_per_token(cfg["num_hidden_layers"], h, cfg["intermediate_size"], v)
    total = read + 2 * v * h
    return {
        "contender": "probe",
        "gemv_gb_s": round(gbs, 2),
        "gemv_default_gb_s": round(default, 2),
        "gemv_no_onednn_gb_s": round(no_onednn, 2),
        "gemv_no_onednn_huge_pages_gb_s": None if huge_no_onednn is None else round(huge_no_onednn, 2),
        "gemv_c_kernel_gb_s": None if kernel is None else round(kernel, 2),
        "bytes_per_token_gb": round(read / 1e9, 3),
        "decode_bound_tok_s": round(gbs * 1e9 / read, 3),
        "decode_bound_all_weights_tok_s": round(gbs * 1e9 / total, 3),
    }


def run_interleaved(path: Path, prompt_len: int, steps: int, compiled: bool = False) -> dict:
    """This package's decode steps and the probe's GEMV taken in turn, step by step, in one
    process: each step against the bandwidth measured right after it, so that the ratio
    does not depend on how the machine's bandwidth drifts between processes (it moves
    from minute to minute on a shared machine). Greedy steps through the model's own
    forward with a ``DynamicCache`` (what ``generate`` runs, without its bookkeeping), or
    with ``compiled`` through the compiled forward ``generate`` uses with a
    ``StaticCache`` and ``CompileConfig()`` (compiled by two untimed steps first)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
    from transformers.generation import CompileConfig

    from qwen import cpu_kernels
    from qwen.kv_cache import CACHE_KWARG

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cfg = model.config
    matrices = probe_matrices(cfg.vocab_size, cfg.hidden_size)
    x = torch.randn(1, cfg.hidden_size).to(torch.bfloat16)
    read = bytes_per_token(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    ids = torch.randint(0, ENDOFTEXT, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    forward = model.get_compiled_call(CompileConfig()) if compiled else model

    def new_cache():
        if compiled:
            return StaticCache(config=cfg, max_cache_len=prompt_len + steps + 1)
        return DynamicCache(config=cfg)

    def decode(token, cache, position: int):
        kwargs = {CACHE_KWARG: cache, "use_cache": True, "position_ids": torch.tensor([[position]])}
        return forward(token, **kwargs).logits[:, -1].argmax(-1, keepdim=True)

    probes = [(F.linear, matrix) for matrix in matrices]
    if cpu_kernels.available():
        probes.append((kernel_gemv, matrices[-1]))
    ratios, step_s, gb_s = [], [], []
    with torch.inference_mode():
        if compiled:
            cache = new_cache()
            token = model(ids, **{CACHE_KWARG: cache}).logits[:, -1].argmax(-1, keepdim=True)
            for i in range(2):
                token = decode(token, cache, prompt_len + i)
        cache = new_cache()
        token = model(ids, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            t = time.perf_counter()
            token = decode(token, cache, prompt_len + i)
            step = time.perf_counter() - t
            best = float("inf")
            with torch.backends.mkldnn.flags(enabled=False):
                for gemv, matrix in probes:
                    t = time.perf_counter()
                    gemv(x, matrix)
                    best = min(best, time.perf_counter() - t)
            bandwidth = matrices[0].numel() * 2 / best
            step_s.append(step)
            gb_s.append(bandwidth / 1e9)
            ratios.append(read / bandwidth / step)
    return {
        "contender": "interleaved-compiled" if compiled else "interleaved",
        "steps": steps,
        "decode_tok_s": round(1 / statistics.median(step_s), 3),
        "gemv_gb_s": round(statistics.median(gb_s), 2),
        "decode_vs_bound": round(statistics.median(ratios), 3),
    }


def run_worker(args) -> dict:
    """The run ``args.worker`` names, in this process; its line records where ``qwen`` came from."""
    which = args.worker.removesuffix(BASELINE)
    if which == "probe":
        result = run_probe(args.ckpt)
    elif which in INTERLEAVED:
        result = run_interleaved(args.ckpt, args.prompt, args.interleaved_steps, compiled=which.endswith("compiled"))
    else:
        path = args.ckpt.with_name(args.ckpt.name + "-qwen2") if which == "qwen2" else args.ckpt
        result = run_model(which, path, args.prompt, args.new_tokens)
    result["contender"] = args.worker
    result["qwen_file"] = getattr(sys.modules.get("qwen"), "__file__", None)
    return result


def run_in_process(which: str, args, baseline: Path | None = None) -> dict:
    """Run ``which`` in a fresh worker process; its JSON line.

    The worker imports ``qwen`` from ``baseline`` for a ``-baseline`` run, else from this
    checkout: that directory goes first on its ``PYTHONPATH`` (ahead of an installed
    package). A line whose ``qwen_file`` lies elsewhere, or a run of this package without
    one, stops the benchmark.
    """
    root = REPO
    if which.endswith(BASELINE):
        if baseline is None:
            raise ValueError(f"{which} needs a baseline checkout")
        root = baseline
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--ckpt", str(args.ckpt)]
    cmd += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    cmd += ["--interleaved-steps", str(args.interleaved_steps)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(1)
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = line.get("qwen_file")
    if imported is None and which != "qwen2":
        raise SystemExit(f"{which}: the worker did not import qwen")
    if imported is not None and not Path(imported).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"{which}: the worker imported qwen from {imported}, not from {root}")
    return line


def baseline_ratios(summary: dict, results: dict[str, list[dict]]) -> dict:
    """current/baseline for each measure the summary holds for both runs of a pair, the
    decode speeds' ratios round by round (each pair ran next to each other) and whether
    both decoded the same greedy tokens."""
    out = {}
    for which in WITH_BASELINE:
        name = which.replace("-", "_")
        name = name if name.startswith("qwen") else f"qwen_{name}"
        for measure in ("load_s", "first_generate_s", "ttft_s", "decode_tok_s", "peak_rss_gib", "decode_vs_bound"):
            current, base = summary.get(f"{name}_{measure}"), summary.get(f"{name}_baseline_{measure}")
            if current is not None and base:
                out[f"{name}_{measure}_vs_baseline"] = round(current / base, 3)
        current, base = results.get(which), results.get(which + BASELINE)
        if which in CONTENDERS and current and base:
            out[f"{name}_decode_tok_s_vs_baseline_per_round"] = [
                round(a["decode_tok_s"] / b["decode_tok_s"], 3) for a, b in zip(current, base, strict=True)
            ]
            out[f"{name}_same_greedy_tokens_as_baseline"] = all(
                a["tokens"] == b["tokens"] for a, b in zip(current, base, strict=True)
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_DIR, help=f"checkpoint dir (default {DEFAULT_DIR})")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument(
        "--interleaved-steps",
        type=int,
        default=64,
        help="after the rounds, this many decode steps of this package each followed by the probe, in one "
        "process (a ratio to the bound that the machine's drift between processes does not move; 0: skip)",
    )
    parser.add_argument(
        "--no-compiled", action="store_true", help="skip the compiled contender and its interleaved run"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout of this repository: also run each of this package's runs with DIR's qwen package "
        "(PYTHONPATH=DIR), alternating, and report the ratios current/baseline",
    )
    workers = [*CONTENDERS, "probe", *INTERLEAVED, *(which + BASELINE for which in WITH_BASELINE)]
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline is not None and not args.worker:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "qwen" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no qwen/__init__.py there (give a checkout of this repository)")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return 0

    ensure_checkpoints(args.ckpt)

    def paired(names) -> list[str]:
        """Each name, followed by its baseline run where ``--baseline`` asks for one."""
        out = []
        for which in names:
            out.append(which)
            if args.baseline is not None and which in WITH_BASELINE:
                out.append(which + BASELINE)
        return out

    contenders = paired(c for c in CONTENDERS if not (args.no_compiled and c == "qwen-compiled"))
    results: dict[str, list[dict]] = defaultdict(list)

    def run(which: str, r: int) -> dict:
        line = run_in_process(which, args, baseline=args.baseline)
        line["round"] = r
        print(json.dumps(line), flush=True)
        results[which].append(line)
        return line

    # Every model run sits between two probe runs (P qwen P qwen2 P ..., next round the
    # other way round): the machine may be shared, so each decode is set against the
    # bandwidth measured just before and just after it.
    bracket: dict[str, list[float]] = {which: [] for which in contenders}
    before = run("probe", 0)
    for r in range(args.rounds):
        for which in contenders if r % 2 == 0 else contenders[::-1]:
            model = run(which, r)
            after = run("probe", r)
            bound = (before["decode_bound_tok_s"] + after["decode_bound_tok_s"]) / 2
            bracket[which].append(round(model["decode_tok_s"] / bound, 3))
            before = after

    def med(which, key):
        return statistics.median(x[key] for x in results[which])

    bound = med("probe", "decode_bound_tok_s")
    summary = {
        "summary": True,
        "rounds": args.rounds,
        "gemv_gb_s": med("probe", "gemv_gb_s"),
        "decode_bound_tok_s": bound,
    }
    if args.baseline is not None:
        summary["baseline"] = str(args.baseline)
    for which in contenders:
        key_of = which.replace("-", "_")
        for key in ("load_s", "ttft_s", "decode_tok_s", "peak_rss_gib", "weights_gib"):
            summary[f"{key_of}_{key}"] = med(which, key)
        # Each run's decode against the mean bound of the probes around it; the median of those.
        summary[f"{key_of}_decode_vs_bound"] = statistics.median(bracket[which])
        summary[f"{key_of}_decode_vs_bound_per_run"] = bracket[which]
        summary[f"{key_of}_decode_vs_median_bound"] = round(summary[f"{key_of}_decode_tok_s"] / bound, 3)
        summary[f"{key_of}_rss_vs_weights"] = round(
            summary[f"{key_of}_peak_rss_gib"] / summary[f"{key_of}_weights_gib"], 3
        )
    for which in ("qwen-compiled", "qwen-compiled" + BASELINE):
        if which in contenders:
            summary[f"{which.replace('-', '_')}_first_generate_s"] = med(which, "first_generate_s")
    if args.interleaved_steps > 0:
        for which in paired(i for i in INTERLEAVED if not (i.endswith("compiled") and args.no_compiled)):
            line = run(which, args.rounds)
            summary[f"qwen_{which.replace('-', '_')}_decode_vs_bound"] = line["decode_vs_bound"]
    if args.baseline is not None:
        summary.update(baseline_ratios(summary, results))
    summary["same_greedy_tokens"] = all(
        a["tokens"] == b["tokens"] for a, b in zip(results["qwen"], results["qwen2"], strict=True)
    )
    if "qwen-compiled" in contenders:
        # Compiled steps fuse and order some roundings differently (as another kernel would):
        # on random weights, whose logits are nearly tied, greedy paths may part after a while.
        summary["compiled_same_greedy_tokens_as_eager"] = all(
            a["tokens"] == b["tokens"] for a, b in zip(results["qwen"], results["qwen-compiled"], strict=True)
        )
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
