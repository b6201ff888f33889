"""GPTQ checkpoints of Qwen-1 models: the on-disk format, packing and unpacking, the
quantization config the official ``-Int4``/``-Int8`` checkpoints carry, and what loading
them through ``transformers``' GPTQ integration (``optimum`` + ``gptqmodel``) needs.

The format (auto-gptq's, ``checkpoint_format: "gptq"``; docs/quantization.md) stores each
quantized ``nn.Linear`` with ``out`` outputs and ``in`` inputs as

- ``qweight`` int32 ``(in * bits / 32, out)``: the integers ``q[o, i]`` in ``[0, 2**bits)``
  packed along the input dimension, ``32 / bits`` per int32, lowest bits first
  (``qweight[r, o] = sum_j q[o, r * 32 / bits + j] << (bits * j)``);
- ``qzeros`` int32 ``(groups, out * bits / 32)``: the zero points ``z[g, o]`` minus one,
  packed along the output dimension the same way (auto-gptq's offset: ``z - 1`` is
  stored and 1 added back when unpacking);
- ``scales`` float16 ``(groups, out)``;
- ``g_idx`` int32 ``(in,)``: the group of each input, ``i // group_size`` without
  ``desc_act``;
- ``bias`` float16 ``(out,)`` where the layer has one,

and the weight is ``W[o, i] = scales[g, o] * (q[o, i] - z[g, o])`` with ``g = g_idx[i]``.
"""

from __future__ import annotations

import logging

import torch

from .loading import prepare_gptqmodel  # noqa: F401  (re-exported: set up gptqmodel's CPU workers)

logger = logging.getLogger(__name__)

# The linears of each block that the official checkpoints quantize (wte, lm_head and the
# norms stay 16-bit), under their official names below ``transformer.h.N.``.
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_BITS = (2, 4, 8)


def gptq_config(bits: int = 4, group_size: int = 128, damp_percent: float = 0.01, desc_act: bool = False) -> dict:
    """The ``quantization_config`` of an official Qwen-1 GPTQ checkpoint's ``config.json``."""
    check_bits(bits)
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def is_gptq(config) -> bool:
    """Whether a config (object or dict) carries a GPTQ ``quantization_config``."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gptq"


# --------------------------------------------------------------------------- packing


def _pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` of a (R, C) tensor into int32 (R * bits / 32, C),
    ``32 / bits`` consecutive rows per int32, the first in the lowest bits."""
    per = 32 // bits
    rows, cols = values.shape
    if rows % per:
        raise ValueError(f"{rows} rows cannot be packed {per} to an int32")
    v = values.to(torch.int64).reshape(rows // per, per, cols)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (v << shifts).sum(dim=1)  # < 2**32: fits int64; reinterpret as int32 below
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_along_rows`: int32 (R', C) -> int64 (R' * 32 / bits, C)."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    values = (p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def pack_gptq(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, g_idx=None
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear: ``q`` (out, in) integers in ``[0, 2**bits)``, ``zeros``
    and ``scales`` (groups, out); ``g_idx`` (in,) defaults to ``i // group_size``."""
    check_bits(bits)
    n_out, n_in = q.shape
    if g_idx is None:
        g_idx = torch.arange(n_in) // group_size
    offset = zeros.to(torch.int64) - 1
    if offset.min() < 0 or offset.max() >= 1 << bits:
        raise ValueError(f"zero points must lie in [1, {1 << bits}] (the format stores them minus one)")
    return {
        "qweight": _pack_along_rows(q.t(), bits),
        "qzeros": _pack_along_rows(offset.t(), bits).t().contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` (out, in), ``zeros`` (groups, out) (the offset undone) and ``g_idx`` (in,) of
    one linear's GPTQ tensors."""
    q = _unpack_along_rows(tensors["qweight"], bits).t()
    stored = _unpack_along_rows(tensors["qzeros"].t().contiguous(), bits).t()
    return q, stored + 1, tensors["g_idx"].to(torch.int64)


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, dtype=torch.float32) -> torch.Tensor:
    """The weight (out, in) that one linear's GPTQ tensors stand for, in ``dtype``."""
    q, zeros, g_idx = unpack_gptq(tensors, bits)
    scales = tensors["scales"].to(torch.float32)
    w = (q - zeros.t()[:, g_idx]).to(torch.float32) * scales.t()[:, g_idx]
    return w.to(dtype).contiguous()


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of ``weight`` (out, in) per group of
    ``group_size`` inputs, as GPTQ's quantizer grid (zero point ``2**(bits-1)``, scale
    ``max|w| / ((2**bits - 1) / 2)``, float16). Returns ``q`` (out, in), ``zeros`` and
    ``scales`` (groups, out)."""
    check_bits(bits)
    n_out, n_in = weight.shape
    if n_in % group_size:
        raise ValueError(f"in_features={n_in} is not a multiple of group_size={group_size}")
    maxq = (1 << bits) - 1
    w = weight.float().reshape(n_out, n_in // group_size, group_size)
    scale = (w.abs().amax(dim=-1) * 2 / maxq).clamp(min=1e-8).to(torch.float16)
    zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    q = (w / scale.float().unsqueeze(-1)).round() + zero.unsqueeze(-1)
    q = q.clamp(0, maxq).to(torch.int64).reshape(n_out, n_in)
    return q, zero.t().contiguous(), scale.t().contiguous()


# --------------------------------------------------------------------------- calibration and quantization


def calibration_samples(data_path, tokenizer, max_len: int = 8192, limit: int | None = None) -> list[list[int]]:
    """Token ids of the conversations in ``data_path`` (the finetuning data format: a JSON
    list or JSON Lines of ``{"conversations": [{"from": "user", "value": ...}, ...]}``),
    each the ChatML text a chat model sees (``finetune_data.encode_conversation``), cut to
    ``max_len`` tokens."""
    from .finetune_data import encode_conversation, read_samples

    samples = read_samples(data_path)
    if limit is not None:
        samples = samples[:limit]
    out = []
    for sample in samples:
        ids = encode_conversation(sample, tokenizer)["input_ids"][:max_len]
        if ids:
            out.append(ids)
    if not out:
        raise ValueError(f"{data_path} holds no calibration samples")
    return out


def quantize_checkpoint(
    model_name_or_path,
    samples: list[list[int]],
    out_path,
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
) -> None:
    """GPTQ-quantize a full-precision (or merged-LoRA) Qwen-1 checkpoint with calibration
    token ids ``samples`` and write a directory that loads as it is: ``config.json`` with
    the ``quantization_config`` of the official checkpoints, ``model.safetensors`` in the
    format of the module docstring, the generation config, the tokenizer files and the
    remote code. The quantization runs through optimum's GPTQ quantizer (the algorithm
    from gptqmodel), on the device the model is loaded on (CPU here; CUDA where there is
    one)."""
    import shutil
    from pathlib import Path

    from optimum.gptq import GPTQQuantizer

    from .cpu_engine import uninstall
    from .modeling_qwen import QWenLMHeadModel
    from .remote_code import write_remote_code

    check_bits(bits)
    prepare_gptqmodel()
    src, out = Path(model_name_or_path), Path(out_path)
    model = QWenLMHeadModel.from_pretrained(model_name_or_path, use_cache=False)
    uninstall(model)  # optimum quantizes modules of exactly nn.Linear only
    model.eval()
    dataset = [
        {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        for ids in samples
    ]
    quantizer = GPTQQuantizer(
        bits=bits,
        dataset=dataset,
        group_size=group_size,
        damp_percent=damp_percent,
        desc_act=desc_act,
        sym=True,
        true_sequential=True,
        block_name_to_quantize="transformer.h",
        model_seqlen=max(len(ids) for ids in samples),
        cache_block_outputs=True,
    )
    quantizer.quantize_model(model, tokenizer=None)
    model.config.quantization_config = gptq_config(bits, group_size, damp_percent, desc_act)
    model.config.use_cache = True
    quantizer.dataset = None  # tensors: not for the quantize_config.json it also writes
    quantizer.save(model, str(out))
    (out / "quantize_config.json").unlink(missing_ok=True)  # the same settings live in config.json
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    write_remote_code(out, backup=False)
    logger.info("wrote the %d-bit GPTQ checkpoint %s", bits, out)
