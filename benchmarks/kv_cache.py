"""int8 KV cache: bytes held against a bf16 cache, and the logit error it causes.

Memory (``kind: "memory"``): for a Qwen-7B-shaped attention (32 layers, 32 heads,
head_dim 128) at each token count and batch size, a bf16 ``DynamicCache`` and an
``Int8KVCache`` are filled with keys and values of that shape, in chunks as a chunked
prefill would, and the bytes of the storages they then hold are summed. To fit this
machine, a run fills ``--measure-layers`` layers (default 1) and at most
``--budget-gib`` of bf16 cache: the batch is halved until it fits. Cache bytes are
exactly linear in layers and batch rows (every row and layer holds the same tensors),
so the full figure is the measured one times ``scale`` = (layers / measured layers) x
(batch / measured batch); each line says what was measured. One extra line
(``kind: "memory-model-check"``) runs a 7B-attention-shaped model forward (1 layer,
small MLP and vocabulary) with ``use_cache_quantization=True`` and checks that the
cache the model builds holds the same bytes as the direct fill.

Logit error (``kind: "logit-error"``): a random tiny checkpoint with head_dim 128 is
run teacher-forced (a prompt, then one token per step) with a float cache, with the
int8 cache, and with an emulation of the official Qwen scheme (one scale per row and
head over each call's tokens, truncation, arithmetic in the model dtype). Reported: the
absolute logit difference to the float cache over the decode steps (mean, max), the
top-1 agreement, and the prompt's logit difference.

    python benchmarks/kv_cache.py                # everything, one JSON line per result
    python benchmarks/kv_cache.py --skip-error --tokens 1024 --batch 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # noqa: E402

from qwen.kv_cache import Int8KVCache  # noqa: E402

GIB = 2**30


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------- memory


def float_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def fill(cache: Cache, layers: int, batch: int, heads: int, tokens: int, head_dim: int, chunk: int) -> None:
    """Append ``tokens`` keys and values per layer in chunks, as a chunked prefill does."""
    g = torch.Generator().manual_seed(0)
    block = torch.randn(batch, heads, min(chunk, tokens), head_dim, generator=g).to(torch.bfloat16)
    for start in range(0, tokens, chunk):
        part = block[:, :, : min(chunk, tokens - start)]
        for i in range(layers):
            if isinstance(cache, Int8KVCache):
                cache.layers[i].append(part, part)  # what the attention does; no float copy returned
            else:
                cache.update(part, part, i)


def memory_rows(args) -> None:
    L, H, D = args.layers, args.heads, args.head_dim
    for tokens in args.tokens:
        for batch in args.batch:
            measured_batch = batch
            per_row = 2 * args.measure_layers * H * tokens * D * 2  # bf16 K and V
            while measured_batch > 1 and measured_batch * per_row > args.budget_gib * GIB:
                measured_batch //= 2
            scale = (L / args.measure_layers) * (batch / measured_batch)

            t0 = time.perf_counter()
            flt = DynamicCache()
            fill(flt, args.measure_layers, measured_batch, H, tokens, D, args.chunk)
            flt_bytes = float_cache_bytes(flt)
            del flt
            q8 = Int8KVCache(num_layers=args.measure_layers)
            fill(q8, args.measure_layers, measured_batch, H, tokens, D, args.chunk)
            q8_bytes = q8.nbytes
            del q8
            expected_q8 = 2 * args.measure_layers * measured_batch * H * tokens * (D + 2 * 2)
            emit(
                {
                    "kind": "memory",
                    "tokens": tokens,
                    "batch": batch,
                    "layers": L,
                    "heads": H,
                    "head_dim": D,
                    "measured_layers": args.measure_layers,
                    "measured_batch": measured_batch,
                    "scale": scale,
                    "bf16_bytes": int(flt_bytes * scale),
                    "int8_bytes": int(q8_bytes * scale),
                    "bf16_gib": round(flt_bytes * scale / GIB, 3),
                    "int8_gib": round(q8_bytes * scale / GIB, 3),
                    "ratio": round(q8_bytes / flt_bytes, 4),
                    "int8_bytes_match_formula": q8_bytes == expected_q8,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )


@torch.no_grad()
def memory_model_check(args, workdir: Path) -> None:
    """A real forward of a 7B-attention-shaped model: the cache it builds holds the same bytes."""
    from qwen.tiny import make_tiny_checkpoint

    tokens = 1024
    ckpt = make_tiny_checkpoint(
        workdir / "attn7b",
        layers=1,
        hidden=args.heads * args.head_dim,
        heads=args.heads,
        intermediate=512,
        vocab_size=1024,
        dtype="bf16",
        init_std=0.02,
    )
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, use_cache_quantization=True).eval()
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = model(ids, use_cache=True).past_key_values
    direct = Int8KVCache(num_layers=1)
    fill(direct, 1, 1, args.heads, tokens, args.head_dim, args.chunk)
    flt = model(ids, use_cache=True, past_key_values=DynamicCache()).past_key_values
    emit(
        {
            "kind": "memory-model-check",
            "tokens": tokens,
            "batch": 1,
            "layers": 1,
            "cache_type": type(cache).__name__,
            "int8_bytes_from_model": cache.nbytes,
            "int8_bytes_direct_fill": direct.nbytes,
            "bf16_bytes_from_model": float_cache_bytes(flt),
            "same": cache.nbytes == direct.nbytes,
        }
    )


# --------------------------------------------------------------------------- logit error


def official_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The official scheme, from its behaviour: per (row, head) over all of the call's
    tokens, scale and zero point in the input dtype, truncation to uint8."""
    qmin = torch.tensor(0, dtype=torch.uint8)
    qmax = torch.tensor(255, dtype=torch.uint8)
    flat = x.flatten(2)
    fmax = flat.amax(-1, keepdim=True)
    fmin = flat.amin(-1, keepdim=True)
    scale = ((fmax - fmin) / (qmax - qmin)).unsqueeze(-1)
    zero = (qmin - fmin / scale.squeeze(-1)).unsqueeze(-1)
    q = torch.clamp(x / scale + zero, qmin, qmax).to(torch.uint8)
    return scale * (q - zero)


class _FakeQuantLayer(DynamicLayer):
    """Stores keys and values after a fake quantization; attention reads them back."""

    fn = staticmethod(official_fake_quant)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(self.fn(key_states), self.fn(value_states))


class _Bf16RoundLayer(_FakeQuantLayer):
    fn = staticmethod(lambda x: x.to(torch.bfloat16).to(x.dtype))


def make_cache(kind: str, layers: int) -> Cache:
    if kind == "float":
        return DynamicCache()
    if kind == "int8":
        return Int8KVCache(num_layers=layers)
    if kind == "official":
        return Cache(layers=[_FakeQuantLayer() for _ in range(layers)])
    if kind == "bf16-rounded":
        return Cache(layers=[_Bf16RoundLayer() for _ in range(layers)])
    raise ValueError(kind)


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, prompt: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    cache = make_cache(kind, model.config.num_hidden_layers)
    first = model(ids[:, :prompt], past_key_values=cache).logits.float()
    steps = [model(ids[:, t : t + 1], past_key_values=cache).logits.float() for t in range(prompt, ids.shape[1])]
    return first, torch.cat(steps, dim=1)


def error_rows(args, workdir: Path) -> None:
    from qwen.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        workdir / "tiny-hd128",
        layers=args.tiny_layers,
        hidden=args.tiny_heads * 128,
        heads=args.tiny_heads,
        intermediate=4 * args.tiny_heads * 128,
        dtype="bf16",
        init_std=args.tiny_init_std,
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (args.error_batch, args.error_prompt + args.error_steps), generator=g)
    for dtype, kinds in ((torch.bfloat16, ("int8", "official")), (torch.float32, ("int8", "official", "bf16-rounded"))):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        ref_first, ref_steps = teacher_forced(model, ids, args.error_prompt, "float")
        for kind in kinds:
            first, steps = teacher_forced(model, ids, args.error_prompt, kind)
            diff = (steps - ref_steps).abs()
            emit(
                {
                    "kind": "logit-error",
                    "checkpoint": f"random, {args.tiny_layers} layers, {args.tiny_heads} heads of 128, std {args.tiny_init_std}",
                    "model_dtype": str(dtype).removeprefix("torch."),
                    "cache": {"int8": "int8 (ours)", "official": "int8 (official scheme, emulated)"}.get(kind, kind),
                    "baseline": f"{str(dtype).removeprefix('torch.')} DynamicCache",
                    "prompt_tokens": args.error_prompt,
                    "decode_steps": args.error_steps,
                    "batch": args.error_batch,
                    "mean_abs_logit_diff": float(diff.mean()),
                    "max_abs_logit_diff": float(diff.max()),
                    "mean_abs_logit": float(ref_steps.abs().mean()),
                    "top1_agreement": float((steps.argmax(-1) == ref_steps.argmax(-1)).float().mean()),
                    "prompt_max_abs_logit_diff": float((first - ref_first).abs().max()),
                }
            )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192], help="cached tokens per row")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="batch sizes")
    p.add_argument("--layers", type=int, default=32, help="layers of the modelled attention (Qwen-7B: 32)")
    p.add_argument("--heads", type=int, default=32, help="attention heads (Qwen-7B: 32)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (Qwen-7B: 128)")
    p.add_argument("--measure-layers", type=int, default=1, help="layers actually filled; bytes scale linearly")
    p.add_argument("--budget-gib", type=float, default=2.0, help="largest bf16 cache actually filled per measurement")
    p.add_argument("--chunk", type=int, default=512, help="tokens appended per update while filling")
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny checkpoint for the logit error")
    p.add_argument("--tiny-heads", type=int, default=4, help="heads (of dim 128) of the tiny checkpoint")
    p.add_argument("--tiny-init-std", type=float, default=0.02, help="weight std of the tiny checkpoint")
    p.add_argument("--error-prompt", type=int, default=96, help="prompt tokens before teacher-forced decoding")
    p.add_argument("--error-steps", type=int, default=64, help="teacher-forced decode steps")
    p.add_argument("--error-batch", type=int, default=4, help="rows for the logit error")
    p.add_argument("--skip-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--skip-error", action="store_true", help="skip the logit-error measurements")
    args = p.parse_args(argv)

    emit(
        {
            "kind": "machine",
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_memory:
            memory_rows(args)
            memory_model_check(args, Path(tmp))
        if not args.skip_error:
            error_rows(args, Path(tmp))


if __name__ == "__main__":
    main()
