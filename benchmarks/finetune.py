"""Finetuning throughput of the batching schemes: samples/s, tokens/s, peak memory, loss.

A small random Qwen-1 model (``--hidden``, ``--layers``, ``--vocab``; default the issue's
hidden 512, 4 layers, the real 151,936-token vocabulary) is trained in full (AdamW, fp32
on CPU; ``--dtype bf16`` on CUDA) for one pass over synthetic samples with a realistic
length mix: most samples 50-400 tokens, ``--long-frac`` of them log-uniform up to
``--max-len`` (2048); the first ~40% of each sample is a masked prompt. Schemes:

* ``pad_to_max``: every sample padded to ``--max-len`` (the original Qwen finetune.py);
* ``pad_to_longest``: each batch padded to its longest sample, batches grouped by length
  (``Trainer``'s ``group_by_length``, as ``qwen.finetune_data.DataCollator`` is used);
* ``packed``: samples packed into rows of ``--max-len`` tokens without attention across
  samples (``SupervisedDataset(packing=True)``), ``--batch-size`` rows per step.

The schemes alternate, so that load from other work on a shared machine hits them alike:
each scheme's pass is cut into ``--rounds`` parts, and every round runs each scheme's part
in a fresh process (clean peak memory: CUDA max allocated, else the process's peak RSS),
the order rotating from round to round. The learning rate is 0 by default (``--lr``):
every step is still a full forward, backward and AdamW step, but the weights stay those of
the seed, so a part can start in a new process from the same weights and every step's loss
is the initial model's. ``loss`` is then the token-weighted mean loss over the whole data
set under that scheme's batches, equal for all schemes when the batching is right. Each
process first runs one untimed step on a short batch (allocating gradients and optimizer
state). Prints one JSON line per part, one per scheme and a ``summary`` line with the
speed-ups over ``pad_to_max``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time

import torch


def make_samples(n: int, max_len: int, long_frac: float, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        if torch.rand((), generator=gen).item() < long_frac:
            lo, hi = math.log(400), math.log(max_len)
            length = int(math.exp(lo + (hi - lo) * torch.rand((), generator=gen).item()))
        else:
            length = int(torch.randint(50, 401, (), generator=gen))
        length = min(length, max_len)
        ids = torch.randint(0, vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[: int(0.4 * length)] = -100
        samples.append((ids, labels))
    return samples


def batches(scheme: str, samples, batch_size: int, max_len: int, seed: int):
    from qwen.finetune_data import DataCollator, pack_lengths

    collate = DataCollator(pad_token_id=0)
    feats = [{"input_ids": ids, "labels": labels} for ids, labels in samples]
    if scheme == "pad_to_max":
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in range(0, len(order), batch_size):
            group = [feats[j] for j in order[i : i + batch_size]]
            padded = DataCollator(pad_token_id=0, pad_to_multiple_of=max_len)(group)
            yield padded, len(group), sum(len(f["input_ids"]) for f in group)
    elif scheme == "pad_to_longest":
        from transformers.trainer_pt_utils import LengthGroupedSampler

        torch.manual_seed(seed)
        order = list(LengthGroupedSampler(batch_size, lengths=[len(f["input_ids"]) for f in feats]))
        for i in range(0, len(order), batch_size):
            group = [feats[j] for j in order[i : i + batch_size]]
            yield collate(group), len(group), sum(len(f["input_ids"]) for f in group)
    else:
        rows = pack_lengths([len(f["input_ids"]) for f in feats], max_len)
        packed = []
        for row in rows:
            labels = []
            for k, j in enumerate(row):
                sample_labels = feats[j]["labels"].clone()
                if k:
                    sample_labels[0] = -100
                labels.append(sample_labels)
            packed.append(
                (
                    {
                        "input_ids": torch.cat([feats[j]["input_ids"] for j in row]),
                        "labels": torch.cat(labels),
                        "position_ids": torch.cat([torch.arange(len(feats[j]["input_ids"])) for j in row]),
                    },
                    len(row),
                )
            )
        order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in range(0, len(order), batch_size):
            group = [packed[j] for j in order[i : i + batch_size]]
            yield collate([g[0] for g in group]), sum(g[1] for g in group), sum(len(g[0]["input_ids"]) for g in group)


def worker(args) -> dict:
    """One part (``--part`` of ``--rounds``) of one scheme's pass, in this process."""
    from qwen import QWenConfig, QWenLMHeadModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(args.seed)
    config = QWenConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        kv_channels=64,
        intermediate_size=args.hidden * 16 // 3 // 2 * 2,
        seq_length=args.max_len,
        max_position_embeddings=args.max_len,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    model = QWenLMHeadModel(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    samples = make_samples(args.samples, args.max_len, args.long_frac, args.vocab, args.seed)
    all_batches = list(batches(args.worker, samples, args.batch_size, args.max_len, args.seed))
    part = all_batches[args.part * len(all_batches) // args.rounds : (args.part + 1) * len(all_batches) // args.rounds]

    def step(batch) -> float:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.float().item()

    warm = torch.randint(0, args.vocab, (args.batch_size, 64), generator=torch.Generator().manual_seed(args.seed))
    step({"input_ids": warm, "labels": warm})  # untimed
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seen = tokens = padded = 0
    loss_sum, loss_tokens = 0.0, 0
    start = time.perf_counter()
    for batch, n_samples, n_tokens in part:
        n = int((batch["labels"][:, 1:] != -100).sum())  # the tokens the mean loss is over
        loss_sum += step(batch) * n
        loss_tokens += n
        seen += n_samples
        tokens += n_tokens
        padded += batch["input_ids"].numel()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "scheme": args.worker,
        "part": args.part,
        "samples": seen,
        "steps": len(part),
        "real_tokens": tokens,
        "padded_tokens": padded,
        "seconds": seconds,
        "loss_sum": loss_sum,
        "loss_tokens": loss_tokens,
        "peak_mib": round(peak, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen-1: 151936)")
    p.add_argument("--max-len", type=int, default=2048, help="model_max_length: pad_to_max and packed row length")
    p.add_argument(
        "--samples", type=int, default=256, help="samples in the pass (~36 s each padded to 2048 on 2 CPU cores)"
    )
    p.add_argument("--long-frac", type=float, default=0.05, help="share of samples 400..max-len tokens long")
    p.add_argument("--batch-size", type=int, default=2, help="samples (packed: rows) per step")
    p.add_argument("--rounds", type=int, default=3, help="parts each scheme's pass is cut into; schemes alternate")
    p.add_argument("--lr", type=float, default=0.0, help="AdamW learning rate (0: the loss check holds exactly)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="training dtype (bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, samples and orders")
    p.add_argument("--schemes", default="pad_to_max,pad_to_longest,packed", help="comma-separated schemes to run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    schemes = args.schemes.split(",")
    unknown = set(schemes) - {"pad_to_max", "pad_to_longest", "packed"}
    if unknown:
        p.error(f"unknown scheme(s) {sorted(unknown)}: choose from pad_to_max, pad_to_longest, packed")
    if args.lr != 0 and args.rounds > 1:
        p.error("--lr other than 0 needs --rounds 1 (each part starts again from the initial weights)")
    env = {
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": _cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            **{k: v for k, v in vars(args).items() if k not in ("worker", "part")},
        }
    }
    print(json.dumps(env), flush=True)
    from tqdm import tqdm

    parts: dict[str, list[dict]] = {name: [] for name in schemes}
    with tqdm(total=args.rounds * len(schemes), desc="parts", file=sys.stderr) as bar:
        for part in range(args.rounds):
            for k in range(len(schemes)):
                scheme = schemes[(part + k) % len(schemes)]
                cmd = [sys.executable, __file__, "--worker", scheme, "--part", str(part)] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "part")
                ]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"{scheme} part {part} failed ({run.returncode}):\n{run.stderr[-3000:]}")
                result = json.loads(run.stdout.strip().splitlines()[-1])
                parts[scheme].append(result)
                print(json.dumps(result), flush=True)
                bar.update()
    results = {}
    for scheme, rs in parts.items():
        seconds = sum(r["seconds"] for r in rs)
        results[scheme] = {
            "scheme": scheme,
            "samples_per_s": round(sum(r["samples"] for r in rs) / seconds, 3),
            "tokens_per_s": round(sum(r["real_tokens"] for r in rs) / seconds, 1),
            "samples": sum(r["samples"] for r in rs),
            "steps": sum(r["steps"] for r in rs),
            "real_tokens": sum(r["real_tokens"] for r in rs),
            "padded_tokens": sum(r["padded_tokens"] for r in rs),
            "seconds": round(seconds, 2),
            "loss": round(sum(r["loss_sum"] for r in rs) / sum(r["loss_tokens"] for r in rs), 6),
            "peak_mib": max(r["peak_mib"] for r in rs),
            "peak_kind": "cuda_max_allocated" if torch.cuda.is_available() else "process_peak_rss",
        }
        print(json.dumps(results[scheme]), flush=True)
    if "pad_to_max" in results:
        ref = results["pad_to_max"]
        speedups = {
            f"{name}_speedup": round(r["samples_per_s"] / ref["samples_per_s"], 2)
            for name, r in results.items()
            if name != "pad_to_max"
        }
        spread = max(r["loss"] for r in results.values()) - min(r["loss"] for r in results.values())
        print(json.dumps({"summary": speedups | {"loss_spread": round(spread, 6)}}))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
