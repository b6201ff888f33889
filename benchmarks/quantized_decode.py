"""Decode speed and memory of GPTQ Int4 and Int8 models against bf16 on CPU, each against its
own memory-bandwidth bound.

The checkpoints: the random Qwen-1.8B-shaped bf16 chat checkpoint of ``benchmarks/decode.py``
(``~/.cache/qwen-bench/qwen-1.8b-random``, written on first use) and Int4/Int8 versions of it
beside it (``...-gptq-int4``, ``...-gptq-int8``, written once): every linear of the blocks
replaced by random integers packed in the official GPTQ format (``qwen.quantization.pack_gptq``:
group size 128, symmetric zero point, float16 scales sized to keep the weights' spread;
no calibration: speed does not depend on the values), ``wte``, ``lm_head`` and the norms as
in the bf16 checkpoint.

Runs, alternating, each in a fresh process and each model run between two probe runs:
  * ``bf16``  ``from_pretrained(path, dtype=torch.bfloat16)`` (the CPU engine's C kernels);
  * ``int4``/``int8``  ``from_pretrained(path, dtype=torch.bfloat16,
    quantization_config=GPTQConfig(bits, backend="gptq_torch"))``: gptqmodel's modules,
    whose products the CPU engine takes through ``qwen.gptq_kernels`` (decoding steps
    through all blocks in one C call);
  * ``probe``  ``benchmarks/decode.py``'s bandwidth probe (the fastest bf16 matrix-vector
    product on offer, over a matrix the size of ``lm_head``).
The **bound** of a model: the probe's bandwidth (the mean of the probes before and after
it) over the bytes one decoding step reads, every stored tensor but the embedding table
(quantized blocks + 16-bit ``lm_head``: ~1.26 GB for Int4, ~1.87 GB for Int8, 3.05 GB for
bf16). Each prints one JSON line; the last line is a summary.

    python benchmarks/quantized_decode.py              # one round: bf16, int4, int8
    python benchmarks/quantized_decode.py --quick      # a small model, a few tokens (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (benchmarks/decode.py: checkpoint, probe, timing helpers)

REPO = decode.REPO
ARMS = ("bf16", "int4", "int8")
GROUP_SIZE = 128
QUICK_SHAPE = dict(layers=2, hidden=256, heads=4, intermediate=1024, vocab_size=151936, seq_length=2048)


def quantized_dir(ckpt: Path, bits: int) -> Path:
    return ckpt.with_name(f"{ckpt.name}-gptq-int{bits}")


def write_quantized(ckpt: Path, bits: int, out: Path) -> Path:
    """An official-layout GPTQ checkpoint of ``ckpt``'s shape with random integers (once)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen.quantization import QUANTIZED_LINEARS, gptq_config, pack_gptq

    if (out / "model.safetensors").exists():
        return out
    print(f"writing a random {bits}-bit GPTQ checkpoint to {out} ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    levels = 2**bits
    spread = ((levels**2 - 1) / 12) ** 0.5  # std of integers uniform over the levels
    tensors = {}
    g = torch.Generator().manual_seed(bits)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for name in f.keys():
            module, _, kind = name.rpartition(".")
            if kind == "weight" and module.split(".", 3)[-1] in QUANTIZED_LINEARS:
                weight = f.get_tensor(name)
                n_out, n_in = weight.shape
                groups = n_in // GROUP_SIZE
                q = torch.randint(0, levels, (n_out, n_in), generator=g, dtype=torch.int64)
                zeros = torch.full((groups, n_out), levels // 2, dtype=torch.int64)
                scales = torch.full((groups, n_out), weight.float().std().item() / spread, dtype=torch.float16)
                for key, value in pack_gptq(q, zeros, scales, bits, GROUP_SIZE).items():
                    tensors[f"{module}.{key}"] = value
            elif kind == "bias" and module.split(".", 3)[-1] in QUANTIZED_LINEARS:
                tensors[name] = f.get_tensor(name).half()  # the official files: float16 biases
            else:
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for item in ckpt.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copyfile(item, tmp / item.name)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = gptq_config(bits, GROUP_SIZE)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def step_bytes(path: Path) -> int:
    """Bytes one decoding step reads: every stored tensor but the embedding table (one row)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name != "transformer.wte.weight":
                sliced = f.get_slice(name)
                numel = 1
                for size in sliced.get_shape():
                    numel *= size
                total += numel * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}[sliced.get_dtype()]
    return total


def run_arm(arm: str, path: Path, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessorList

    from qwen import QWenLMHeadModel

    kwargs = {}
    if arm != "bf16":
        from transformers import GPTQConfig

        kwargs["quantization_config"] = GPTQConfig(bits=int(arm[3:]), backend="gptq_torch")
    t0 = time.perf_counter()
    model = QWenLMHeadModel.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = decode.peak_rss_gib()
    ids = torch.randint(0, decode.ENDOFTEXT, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    out, ttft, tok_s = decode.timed_generate(
        model,
        ids,
        max_new_tokens=new_tokens,
        repetition_penalty=1.0,
        logits_processor=LogitsProcessorList([decode.BanToken(decode.ENDOFTEXT)]),
        pad_token_id=decode.ENDOFTEXT,
    )
    hooked = sum(type(m).__name__ == "CPUTorchLinear" for m in model.modules())
    return {
        "contender": arm,
        "load_s": round(load_s, 2),
        "ttft_s": round(ttft, 3),
        "decode_tok_s": round(tok_s, 3),
        "step_bytes_gb": round(step_bytes(path) / 1e9, 3),
        "peak_rss_gib": round(decode.peak_rss_gib(), 3),
        "rss_after_load_gib": round(rss_loaded, 3),
        "modules_through_gptq_kernel": hooked,
        "tokens": out[0, prompt_len:].tolist()[:8],
    }


def run_in_process(which: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--ckpt", str(args.ckpt)]
    cmd += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the {which} run failed (its messages above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt", type=Path, default=decode.DEFAULT_DIR, help=f"the bf16 checkpoint (default {decode.DEFAULT_DIR})"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (default 1)")
    parser.add_argument(
        "--prompt",
        type=int,
        default=32,
        help="prompt tokens (default 32; the quantized models' prefill goes through the several-rows product)",
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="generated tokens (default 48)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small random model (2 blocks, hidden 256) in a temporary directory, 4 new tokens",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "probe":
            line = decode.run_probe(args.ckpt)
        else:
            path = args.ckpt if args.worker == "bf16" else quantized_dir(args.ckpt, int(args.worker[3:]))
            line = run_arm(args.worker, path, args.prompt, args.new_tokens)
        print(json.dumps(line), flush=True)
        return 0

    scratch = None
    if args.quick:
        from qwen.tiny import make_tiny_checkpoint

        scratch = tempfile.TemporaryDirectory(prefix="quantized-decode-")
        args.ckpt = make_tiny_checkpoint(Path(scratch.name) / "small", chat=True, init_std=0.02, **QUICK_SHAPE)
        args.new_tokens = 4
    else:
        decode.ensure_checkpoints(args.ckpt)
    for bits in (4, 8):
        write_quantized(args.ckpt, bits, quantized_dir(args.ckpt, bits))

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    against_bound: dict[str, list[float]] = {arm: [] for arm in ARMS}
    probes = []

    def run(which: str, r: int) -> dict:
        line = run_in_process(which, args)
        line["round"] = r
        print(json.dumps(line), flush=True)
        return line

    before = run("probe", 0)
    probes.append(before)
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            line = run(arm, r)
            after = run("probe", r)
            probes.append(after)
            gb_s = (before["gemv_gb_s"] + after["gemv_gb_s"]) / 2
            line["bound_tok_s"] = round(gb_s / line["step_bytes_gb"], 3)
            against_bound[arm].append(round(line["decode_tok_s"] / line["bound_tok_s"], 3))
            results[arm].append(line)
            before = after

    def med(arm: str, key: str):
        return statistics.median(line[key] for line in results[arm])

    summary = {"summary": True, "rounds": args.rounds, "quick": args.quick}
    summary["gemv_gb_s"] = statistics.median(p["gemv_gb_s"] for p in probes)
    for arm in ARMS:
        for key in ("decode_tok_s", "bound_tok_s", "step_bytes_gb", "peak_rss_gib", "load_s", "ttft_s"):
            summary[f"{arm}_{key}"] = med(arm, key)
        summary[f"{arm}_decode_vs_bound"] = statistics.median(against_bound[arm])
    for arm in ("int4", "int8"):
        summary[f"{arm}_vs_bf16"] = round(summary[f"{arm}_decode_tok_s"] / summary["bf16_decode_tok_s"], 3)
        summary[f"{arm}_modules_through_gptq_kernel"] = results[arm][0]["modules_through_gptq_kernel"]
    print(json.dumps(summary), flush=True)
    if scratch is not None:
        for bits in (4, 8):
            shutil.rmtree(quantized_dir(args.ckpt, bits), ignore_errors=True)
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
