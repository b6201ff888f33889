"""Throughput and time to first token of openai_api.py under concurrent streaming clients.

For each server configuration (``name:dtype:max_batch_size``), starts
``openai_api.py --cpu-only`` on the Qwen-1.8B-shaped random bf16 chat checkpoint of
``benchmarks/decode.py`` and, for each client count, lets that many clients send one
streaming ``/v1/completions`` request each, all at once: a fixed prompt of
``--prompt-tokens`` random token ids (a different one per client) and exactly
``--max-tokens`` generated tokens (greedy, ``ignore_eos``). The default
configurations are the continuous-batching server in bf16 (the checkpoint's dtype,
what ``--dtype auto`` picks) and in fp32, and the same model served one request at a
time (``--max-batch-size 1``: the original server's design) in bf16, its fastest
dtype for single requests. Configurations alternate over ``--rounds``.

Each load prints one JSON line: aggregate tokens/s (all generated tokens over the
wall time from the first request sent to the last token received), p50/p95 time to
first token and p50 request latency. The last lines are per-client-count summaries
(medians over rounds) with the speedup of each batched configuration over the
fastest one-at-a-time configuration.

With ``--baseline DIR`` (another checkout of this repository, e.g. the previous commit:
``mkdir DIR && git archive HEAD~1 | tar -x -C DIR``) each configuration also runs as ``NAME-baseline``:
``DIR/openai_api.py`` with DIR's ``qwen`` package, right after (or, in odd rounds, before)
the same configuration on this checkout. Every line records the ``qwen.__file__`` its
server imported; the summaries add the ratios current/baseline (``NAME:dtype_vs_baseline``).

    python benchmarks/serve_load.py --rounds 1
    python benchmarks/serve_load.py --rounds 2 --baseline /tmp/baseline
    python benchmarks/serve_load.py --configs batched:bf16:16,one-at-a-time:bf16:1 --clients 16 \\
        --prompt-tokens 16 --max-tokens 128 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = "batched:bf16:16,batched:fp32:16,one-at-a-time:bf16:1"
BASELINE = "-baseline"  # suffix of a configuration served by the baseline checkout
# Runs a checkout's openai_api.py (argv[1]) with that checkout first on sys.path, after
# importing its qwen package and saying where from (the line is read from the server's log).
SERVER_BOOT = """\
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
import qwen
print("qwen_file=" + qwen.__file__, flush=True)
runpy.run_path(script, run_name="__main__")
"""


def _decode_module():
    spec = importlib.util.spec_from_file_location("bench_decode", HERE / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_checkpoint(path: Path) -> Path:
    """The checkpoint of benchmarks/decode.py (written once, reused)."""
    if not (path / "model.safetensors").exists():
        from qwen.tiny import make_tiny_checkpoint

        print(f"writing a random Qwen-1.8B-shaped checkpoint to {path} ...", file=sys.stderr)
        make_tiny_checkpoint(path, chat=True, dtype="bf16", init_std=0.02, **_decode_module().SHAPE)
    return path


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    except OSError:
        isa = []
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": isa,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ROOT/openai_api.py`` of a checkout (this one by default), importing that
    checkout's ``qwen`` package (first on its path); ``qwen_file`` is where it came from."""

    def __init__(self, ckpt: Path, dtype: str, max_batch_size: int, threads: int, log: Path, root: Path = REPO):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", SERVER_BOOT, str(root / "openai_api.py"), "-c", str(ckpt), "--cpu-only"]
        cmd += ["--server-port", str(self.port), "--dtype", dtype, "--max-batch-size", str(max_batch_size)]
        cmd += ["--max-queue", "256", "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 1800:
                self.stop()
                raise RuntimeError("server did not start within 30 minutes")
            time.sleep(1)
        self.load_s = time.perf_counter() - t0
        found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("qwen_file=")]
        self.qwen_file = found[0].removeprefix("qwen_file=") if found else None
        if self.qwen_file is None or not Path(self.qwen_file).resolve().is_relative_to(Path(root).resolve()):
            self.stop()
            raise RuntimeError(f"the server of {root} imported qwen from {self.qwen_file}, not from {root}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"start": start, "ttft": (first or end) - start, "end": end, "tokens": tokens}


async def run_load(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))
        wall = max(r["end"] for r in results) - t0
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 3),
        "ttft_p50_s": round(_quantile(ttfts, 0.5), 2),
        "ttft_p95_s": round(_quantile(ttfts, 0.95), 2),
        "latency_p50_s": round(statistics.median(r["end"] - r["start"] for r in results), 2),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def baseline_ratios(results: list[dict], configs: list[dict], clients: int) -> dict:
    """For each configuration run on both checkouts: current/baseline of the medians
    (tokens/s, time to first token) and of tokens/s round by round (each pair ran next to
    each other), at ``clients`` concurrent clients."""
    out = {}
    for config in configs:
        if config["config"].endswith(BASELINE):
            continue
        dtype = config["dtype"]
        current, base = (
            sorted(
                (x for x in results if x["clients"] == clients and x["config"] == name and x["dtype"] == dtype),
                key=lambda x: x["round"],
            )
            for name in (config["config"], config["config"] + BASELINE)
        )
        if not current or not base:
            continue
        ratios = {}
        for measure in ("tok_s", "ttft_p50_s", "ttft_p95_s"):
            a, b = (statistics.median(x[measure] for x in side) for side in (current, base))
            ratios[measure] = round(a / b, 3) if b else None
        ratios["tok_s_per_round"] = [round(a["tok_s"] / b["tok_s"], 3) for a, b in zip(current, base, strict=True)]
        out[f"{config['config']}:{dtype}_vs_baseline"] = ratios
    return out


def main() -> int:
    # Stop the server we started when killed, too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    decode = _decode_module()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt", type=Path, default=decode.DEFAULT_DIR, help=f"checkpoint (default {decode.DEFAULT_DIR})"
    )
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"name:dtype:max_batch_size,... ({DEFAULT_CONFIGS})")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per load (default 1,4,16)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, configurations alternating (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="server torch threads (default: torch's choice)")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout of this repository: also run each configuration as NAME-baseline with "
        "DIR/openai_api.py and DIR's qwen package, alternating, and report the ratios current/baseline",
    )
    args = parser.parse_args()
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "openai_api.py").is_file() or not (args.baseline / "qwen" / "__init__.py").is_file():
            parser.error(
                f"--baseline {args.baseline}: no openai_api.py and qwen/ there (give a checkout of this repository)"
            )

    configs = []
    for spec in args.configs.split(","):
        name, dtype, batch = spec.split(":")
        configs.append({"config": name, "dtype": dtype, "max_batch_size": int(batch)})
        if args.baseline is not None:
            configs.append({"config": name + BASELINE, "dtype": dtype, "max_batch_size": int(batch)})
    clients = [int(c) for c in args.clients.split(",")]
    ckpt = ensure_checkpoint(args.ckpt)
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 151643) for _ in range(args.prompt_tokens)] for _ in range(max(clients))]
    print(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}), flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for config in order:
                log = Path(tmp) / f"server-{config['config']}-{config['dtype']}-{r}.log"
                root = args.baseline if config["config"].endswith(BASELINE) else REPO
                server = Server(ckpt, config["dtype"], config["max_batch_size"], args.threads, log, root=root)
                try:
                    asyncio.run(run_load(server.url, prompts[:1], 2))  # warm-up, not measured
                    for count in clients:
                        load_before = load_average()
                        line = {**config, "round": r, "clients": count, "prompt_tokens": args.prompt_tokens}
                        line["max_tokens"] = args.max_tokens
                        line.update(asyncio.run(run_load(server.url, prompts[:count], args.max_tokens)))
                        line.update(server_load_s=round(server.load_s, 1), loadavg=[load_before, load_average()])
                        line["qwen_file"] = server.qwen_file
                        print(json.dumps(line), flush=True)
                        results.append(line)
                finally:
                    server.stop()

    for count in clients:
        summary = {"summary": True, "clients": count}
        medians = {}
        for config in configs:
            key = f"{config['config']}:{config['dtype']}"
            rows = [x for x in results if x["clients"] == count and f"{x['config']}:{x['dtype']}" == key]
            medians[key] = {m: statistics.median(x[m] for x in rows) for m in ("tok_s", "ttft_p50_s", "ttft_p95_s")}
            summary[key] = medians[key]
        # Batched over the fastest one-at-a-time configuration, of this checkout and of the baseline apart.
        for suffix in ("", BASELINE) if args.baseline is not None else ("",):
            group = {k: v for k, v in medians.items() if k.split(":")[0].endswith(BASELINE) == bool(suffix)}
            group = group if args.baseline is not None else medians
            singles = {k: v["tok_s"] for k, v in group.items() if k.split(":")[0].removesuffix(suffix) != "batched"}
            if singles:
                best = max(singles, key=singles.get)
                summary["best_one_at_a_time" + suffix.replace("-", "_")] = best
                for key, value in group.items():
                    if key.split(":")[0].removesuffix(suffix) == "batched":
                        summary[f"speedup_{key}"] = round(value["tok_s"] / singles[best], 2)
        if args.baseline is not None:
            summary.update(baseline_ratios(results, configs, count))
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
