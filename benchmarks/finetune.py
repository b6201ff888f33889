"""Finetuning throughput of the batching schemes: samples/s, tokens/s, peak memory, loss.

A small random Qwen-1 model (``--hidden``, ``--layers``, ``--vocab``) is trained in full
(AdamW, fp32 on CPU; ``--dtype bf16`` on CUDA) for one pass over synthetic samples with a
realistic length mix: most samples 50-400 tokens, ``--long-frac`` of them log-uniform up to
``--max-len``; the first ~40% of each sample is a masked prompt. Schemes:

* ``pad_to_max``: every sample padded to ``--max-len`` (the original Qwen finetune.py);
* ``pad_to_longest``: each batch padded to its longest sample, batches grouped by length
  (``Trainer``'s ``group_by_length``, as ``qwen.finetune_data.DataCollator`` is used);
* ``packed``: samples packed into rows of ``--max-len`` tokens without attention across
  samples (``SupervisedDataset(packing=True)``), ``--batch-size`` rows per step.

Each scheme runs in its own process (clean peak memory: CUDA max allocated, else the
process's peak RSS) from the same initial weights over the same samples. ``loss`` is the
initial model's token-weighted mean loss over the whole data set under that scheme's
batches (no grad): equal for all schemes when the batching is right. Prints one JSON line
per scheme and a ``summary`` line with the speed-ups over ``pad_to_max``.
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
            yield padded, len(group)
    elif scheme == "pad_to_longest":
        from transformers.trainer_pt_utils import LengthGroupedSampler

        torch.manual_seed(seed)
        order = list(LengthGroupedSampler(batch_size, lengths=[len(f["input_ids"]) for f in feats]))
        for i in range(0, len(order), batch_size):
            group = [feats[j] for j in order[i : i + batch_size]]
            yield collate(group), len(group)
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
            yield collate([g[0] for g in group]), sum(g[1] for g in group)


def worker(args) -> dict:
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
    model = QWenLMHeadModel(config).to(device=device, dtype=dtype)
    samples = make_samples(args.samples, args.max_len, args.long_frac, args.vocab, args.seed)

    # the initial model's loss over the data set, token-weighted
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, _ in batches(args.worker, samples, args.batch_size, args.max_len, args.seed):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.float().item() * n
            count += n

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seen = tokens = padded = steps = 0
    start = time.perf_counter()
    for batch, n_samples in batches(args.worker, samples, args.batch_size, args.max_len, args.seed + 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += n_samples
        padded += batch["input_ids"].numel()
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids, _ in samples)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "scheme": args.worker,
        "samples_per_s": round(seen / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "steps": steps,
        "padded_tokens": padded,
        "real_tokens": tokens,
        "seconds": round(seconds, 2),
        "loss": round(total / count, 6),
        "peak_mib": round(peak, 1),
        "peak_kind": "cuda_max_allocated" if device == "cuda" else "process_peak_rss",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--long-frac", type=float, default=0.05, help="share of samples 400..max-len tokens long")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schemes", default="pad_to_max,pad_to_longest,packed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    env = {
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            **{k: v for k, v in vars(args).items() if k != "worker"},
        }
    }
    print(json.dumps(env), flush=True)
    results = {}
    for scheme in args.schemes.split(","):
        cmd = [sys.executable, __file__, "--worker", scheme] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "schemes")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[scheme] = json.loads(out)
        print(out, flush=True)
    if "pad_to_max" in results:
        ref = results["pad_to_max"]
        print(
            json.dumps(
                {
                    "summary": {
                        f"{name}_speedup": round(r["samples_per_s"] / ref["samples_per_s"], 2)
                        for name, r in results.items()
                        if name != "pad_to_max"
                    }
                    | {
                        "loss_spread": max(r["loss"] for r in results.values())
                        - min(r["loss"] for r in results.values())
                    }
                }
            )
        )


if __name__ == "__main__":
    main()
