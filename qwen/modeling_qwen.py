"""The first-generation Qwen network on current ``transformers``.

Computes the same function as the official remote code (``modeling_qwen.py`` of the
published checkpoints) with the state-dict names of those checkpoints, built on the
library's extension points: ``PreTrainedModel`` + ``GenerationMixin``, ``Cache``
objects and the attention interface (SDPA, eager, flash-attention-2).

This file belongs to a self-contained set (configuration, modeling, tokenization,
generation utilities) that can be copied into a checkpoint directory as remote code:
it imports its siblings relatively and nothing else from this package.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import json
import logging
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import StoppingCriteriaList
from transformers.masking_utils import create_causal_mask, sliding_window_overlay
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_qwen import PRECISION_FLAGS, QWenConfig
from .cpu_kernels import (
    BlockSteps,
    decode_attention,
    env_switched_off,
    linear_row,
    qkv_row,
    rms_norm,
    rotary_qk,
    swiglu_row,
)
from .kv_cache import CACHE_KWARG, GrowingLayer, Int8KVCache, grow_in_place, make_cache, use_int8_cache_for_generation
from .qwen_generation_utils import QWenChatMixin, StopWordsCriteria

logger = logging.getLogger(__name__)

_DTYPE_OF_FLAG = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- helpers


def _as_requested(output, return_dict: bool | None, config: PretrainedConfig):
    """``output`` as a tuple (its fields that are not None, in order) where ``return_dict``
    (or, left out, ``config.return_dict``) is False, as transformers' models do."""
    wanted = config.return_dict if return_dict is None else return_dict
    return output if wanted else output.to_tuple()


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache passed under either name (``cache`` from transformers 5.24 on)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not two different ones")
    return cache


_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def ntk_alpha(length: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Dynamic-NTK alpha for key lengths ``length``: ``max(2**ceil(log2(L/S) + 1) - 1, 1)``."""
    ratio = length.to(torch.float64) / seq_length
    alpha = torch.exp2(torch.ceil(torch.log2(ratio) + 1)) - 1
    return alpha.clamp(min=1.0)


# Dynamic-NTK alpha of each row of a cache, fixed when its sequence started (the cached
# keys were rotated with it): an attribute of the cache object, so that copies of a
# cache (copy.deepcopy of a prompt cache) keep it.
_NTK_ALPHA_ATTR = "qwen_ntk_alpha"


def ntk_alpha_of(cache: Cache) -> torch.Tensor | None:
    """The per-row dynamic-NTK alpha (B,) the model fixed for ``cache``, or None."""
    return getattr(cache, _NTK_ALPHA_ATTR, None)


def set_ntk_alpha(cache: Cache, alpha: torch.Tensor) -> None:
    """Fix the per-row dynamic-NTK alpha (B,) of ``cache`` (for caches built by hand,
    say by joining rows of other caches)."""
    setattr(cache, _NTK_ALPHA_ATTR, alpha)


def logn_scale(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """LogN query factor at 0-based positions: ``max(1, log(p + 1) / log(seq_length))``."""
    p = position_ids.to(torch.float32) + 1
    return (torch.log(p) / math.log(seq_length)).clamp(min=1.0)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and a sign-folded ``sin`` from :class:`QWenRotaryEmbedding` ((B, q, 1, dim)),
    shaped (B, q, 1, 1, dim) to rotate queries and keys together with :func:`apply_rotary`.

    The rotate-half convention ``x * cos + cat(-x2, x1) * sin`` is computed as
    ``x * cos + cat(x2, x1) * cat(-sin1, sin2)``: the same numbers (negation is exact),
    one swap of the halves instead of a split, a negation and a concatenation.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` (..., d) in float32 (rotate-half
    convention; ``signed_sin`` from :func:`rotary_tables`), rounded back to ``x.dtype``."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    swapped = x_rot.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    out = x_rot * cos + swapped * signed_sin
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:].float()), dim=-1)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- modules


# torch's bf16/fp16 CPU matmul costs about one matrix-vector product per row on CPUs
# without native half-precision arithmetic (most AVX2 machines): fine for one row (it is
# memory-bound), slow for more. From this many rows on, no-grad CPU matmuls run in
# float32 instead, converting the weight a block of rows at a time into a small buffer
# that stays in cache, so the weight is read once, in half precision, and never copied
# whole. Measured (2-core AVX2, 2048 x 5504, bf16): 16 rows 16.4 ms -> 4.2 ms, 64 rows
# 66 ms -> 10.5 ms (whole-weight upcast: 35 ms), 2 rows about even. Products of
# half-precision numbers are exact in float32, so this only changes the accumulation
# order, as a different GEMM kernel would.
# CPUs with native bf16 (AVX512-BF16, AMX) keep torch's own kernel for several rows.
#
# One row (a decoding step) is the opposite case: there torch sends half-precision
# matmuls to oneDNN on CPUs with native bf16, whose matrix-vector product reads the
# weight at about 55-60% of the speed of torch's own GEMV kernel (2-core AVX512-BF16
# EPYC: 2048 x 5504 bf16 1.15 ms vs 0.66 ms; the lm_head GEMV 21 vs 35 GB/s), so
# one-row products run with oneDNN switched off. Both accumulate in float32 and round
# once; on CPUs without native bf16 torch never used oneDNN for them, so nothing changes.
CPU_FP32_MIN_ROWS = 4
CPU_FP32_BLOCK_BYTES = 8 * 2**20

# Inductor options for compiled CPU decoding (see QWenLMHeadModel.get_compiled_call).
# With its defaults, Inductor inlines the rotary embedding of the query into the
# attention's reduction over the keys and so recomputes it once per key (1.1 ms a layer
# at 256 cached positions on a 2-core AVX512-BF16 EPYC); realizing every intermediate
# of more than 4 operations computes it once (0.13 ms).
CPU_COMPILE_OPTIONS = {"realize_opcount_threshold": 4}


def _cpu_native_probe(dtype: torch.dtype) -> bool:
    probes = (
        ("_is_amx_fp16_supported",)
        if dtype == torch.float16
        else ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# Probed once at import: torch.compile cannot trace the probes, and a first call made
# while tracing (a compiled prefill in a fresh process) would break the graph.
_CPU_NATIVE = {dtype: _cpu_native_probe(dtype) for dtype in (torch.bfloat16, torch.float16)}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul has hardware support for ``dtype`` here (private torch probes)."""
    return _CPU_NATIVE.get(dtype, False)


def cpu_half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for half-precision CPU tensors, accumulated in float32.

    The weight is converted ``CPU_FP32_BLOCK_BYTES`` at a time; each block's outputs are
    computed as ``block @ x.T`` into rows of a transposed float32 result, rounded once.
    """
    n_out, n_in = weight.shape
    xt = x.reshape(-1, n_in).float().t()
    out = torch.empty(n_out, xt.shape[1], dtype=torch.float32)
    rows = max(16, CPU_FP32_BLOCK_BYTES // (4 * n_in))
    buffer = torch.empty(min(rows, n_out), n_in, dtype=torch.float32)
    for start in range(0, n_out, rows):
        stop = min(n_out, start + rows)
        block = buffer[: stop - start]
        block.copy_(weight[start:stop])
        if bias is None:
            torch.mm(block, xt, out=out[start:stop])
        else:
            torch.addmm(bias[start:stop].float().unsqueeze(1), block, xt, out=out[start:stop])
    result = out.t().to(x.dtype, memory_format=torch.contiguous_format)
    return result.reshape(*x.shape[:-1], n_out)


def cpu_half_inference(x: torch.Tensor) -> bool:
    """No-grad inference on half-precision (bf16/fp16) CPU tensors."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()


def cpu_one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for one half-precision CPU row through torch's GEMV, not oneDNN's."""
    get = getattr(torch._C, "_get_mkldnn_enabled", None)
    if get is None or not get():
        return F.linear(x, weight, bias)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(True)


def _one_row_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Under torch.compile the oneDNN switch of cpu_one_row_linear cannot be traced (a graph
# break at every linear); as an opaque operator it stays one call inside the compiled
# graph. Registered once per process: a copy of this file loaded as remote code next
# to this package reuses it.
if hasattr(torch.library, "custom_op") and not hasattr(torch.ops.qwen, "one_row_linear"):
    torch.library.custom_op("qwen::one_row_linear", mutates_args=())(cpu_one_row_linear).register_fake(
        _one_row_linear_fake
    )


# True while compiled one-row steps run with oneDNN switched off as a whole
# (:func:`onednn_off_for_one_row_step`): their one-row products then stay plain F.linear
# in the graph, where the operator's round trip costs ~10% of a compiled step. Steps in
# several threads share the switch: the first to start turns oneDNN off, the last to
# end restores it.
_onednn_off_for_step = False
_one_row_steps = 0
_onednn_before_steps = True
_one_row_steps_lock = threading.Lock()


@contextlib.contextmanager
def onednn_off_for_one_row_step():
    """Switch oneDNN off around a compiled one-row CPU step (what the operator does for
    each product) and let the step trace its one-row products as plain ``F.linear``."""
    global _onednn_off_for_step, _one_row_steps, _onednn_before_steps
    with _one_row_steps_lock:
        if _one_row_steps == 0:
            _onednn_before_steps = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            _onednn_off_for_step = True
        _one_row_steps += 1
    try:
        yield
    finally:
        with _one_row_steps_lock:
            _one_row_steps -= 1
            if _one_row_steps == 0:
                _onednn_off_for_step = False
                torch._C._set_mkldnn_enabled(_onednn_before_steps)


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`cpu_one_row_linear`, through the ``qwen::one_row_linear`` operator while compiling
    (plain ``F.linear`` inside :func:`onednn_off_for_one_row_step`)."""
    if torch.compiler.is_compiling():
        if _onednn_off_for_step or not hasattr(torch.ops.qwen, "one_row_linear"):
            return F.linear(x, weight, bias)
        return torch.ops.qwen.one_row_linear(x, weight, bias)
    return cpu_one_row_linear(x, weight, bias)


class QWenLinear(nn.Linear):
    """``nn.Linear`` with faster no-grad half-precision CPU paths: one row through torch's
    GEMV kernel, several rows in float32 on CPUs without native half-precision matmuls,
    or through a oneDNN-packed copy of the weight after :func:`pack_for_cpu_batches`."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None
    _packed_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and cpu_half_inference(x):
            if x.numel() == x.shape[-1]:
                out = linear_row(x, self.weight, self.bias)  # the C kernel (bf16; None where it does not apply)
                return one_row_linear(x, self.weight, self.bias) if out is None else out
            if self._packed is not None and x.numel() <= 2 * self._packed_rows * x.shape[-1]:
                if self._packed_key == _weight_key(self.weight):
                    return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
                self._packed = None  # the weight changed since it was packed
            if x.numel() >= CPU_FP32_MIN_ROWS * x.shape[-1] and not cpu_has_native(x.dtype):
                return cpu_half_linear(x, self.weight, self.bias)
        return super().forward(x)


def _weight_key(weight: torch.Tensor) -> tuple:
    """What tells a packed copy that its weight changed: in-place writes bump the
    version; ``model.to(...)`` and assigning ``.data`` a new tensor change the storage,
    dtype or shape. Writes through ``.data`` in place are invisible (they bump no
    version): pack after such changes (peft's ``merge_and_unload`` makes them)."""
    return (weight._version, weight.data_ptr(), weight.dtype, weight.shape)


def pack_for_cpu_batches(model: nn.Module, rows: int) -> int:
    """Give each half-precision CPU ``QWenLinear`` of ``model`` a oneDNN-packed copy of its
    weight, laid out for products of about ``rows`` rows; no-grad products of 2 to
    ``2 * rows`` rows then use it (the same results; a 16-row decoding step of a
    1.8B-shaped model on a 2-core AVX512-BF16 CPU: 0.33 s -> 0.20 s). One-row products
    and long prefills keep the plain weight, so this costs a second copy of the weights
    in memory; a weight changed in place or replaced drops its copy (not a write
    through ``.data``: pack after merging adapters). Does nothing where CPU
    bf16/fp16 matmuls are not native. Returns the bytes added."""
    added = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, QWenLinear):
                continue
            weight = module.weight
            if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
                continue
            if not cpu_has_native(weight.dtype):
                continue
            module._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            module._packed_key = _weight_key(weight)
            module._packed_rows = rows
            added += weight.numel() * weight.element_size()
    return added


class QWenRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rms_norm(x, self.weight, self.eps)  # the C kernel: bf16 inference on CPU, else None
        if out is not None:
            return out
        # x * rsqrt(mean(x^2) + eps) in float32 (torch's fused kernel), cast back, times the weight
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return h.to(x.dtype) * self.weight


class QWenRotaryEmbedding(nn.Module):
    """Rotary embedding over the first ``rotary_pct * kv_channels`` dims, rotate-half
    convention, with an optional per-row dynamic-NTK ``alpha``. No buffers: the inverse
    frequencies are a few dozen numbers, recomputed per forward in float32."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.dim = int(config.kv_channels * config.rotary_pct)
        self.base = float(config.rotary_emb_base)

    def forward(
        self, position_ids: torch.Tensor, alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, q, 1, dim) in float32 for positions (B, q)."""
        device = position_ids.device
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        if alpha is None:
            inv_freq = (1.0 / self.base**exponent)[None, :]
        else:
            base = self.base * alpha.to(device=device, dtype=torch.float64) ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / base.to(torch.float32)[:, None] ** exponent[None, :]
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = QWenLinear(config.hidden_size, width, bias=bias)
        self.w2 = QWenLinear(config.hidden_size, width, bias=bias)
        self.c_proj = QWenLinear(width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_linear(self.w1) and _plain_linear(self.w2):
            # one row (a decoding step) in bf16 on CPU: both products and the gate in one C call
            gated = swiglu_row(x, self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias)
            if gated is not None:
                return self.c_proj(gated)
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


_BUILT_CLASSES: frozenset = frozenset()  # filled below, once the module classes exist


def _as_built(module: nn.Module) -> bool:
    """A module of this file's own class (not replaced by an adapter's or quantizer's), with
    no hooks, no patched forward and not compiled on its own (``module.compile()``):
    calling it runs exactly this file's code."""
    return (
        type(module) in _BUILT_CLASSES
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
        and module._compiled_call_impl is None
    )


def _plain_linear(module: nn.Module) -> bool:
    """A ``QWenLinear`` as built: calling it is exactly ``F.linear`` with its weight and bias."""
    return type(module) is QWenLinear and _as_built(module)


def _global_module_hooks() -> bool:
    """Whether forward hooks for every module are registered (``nn.modules.module.register_module_forward_hook``)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention: (B, H, q, d) x (B, H, k, d) -> (B, q, H, d), softmax in float32."""
    bsz, heads, q_len, dim = query.shape
    # One query (a decoding step) against a cache that may be a view of a larger buffer
    # (GrowingLayer): 3-d products over B*H read it in place, where 4-d matmuls copy it.
    in_place = q_len == 1 and all(t.shape[1] == heads and t.stride(0) == heads * t.stride(1) for t in (key, value))
    if in_place:
        keys = key.view(bsz * heads, key.shape[2], dim)
        rows = query.reshape(bsz * heads, 1, dim)
        # float32 (MKL): q K^T is the fast orientation; bf16/fp16 (oneDNN): K q.
        scores = torch.bmm(rows, keys.transpose(1, 2)) if query.dtype == torch.float32 else torch.bmm(keys, rows.mT)
        weights = scores.view(bsz, heads, 1, -1) * scaling
    else:
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=module.training)
    if in_place:
        values = value.view(bsz * heads, value.shape[2], value.shape[3])
        out = torch.bmm(weights.view(bsz * heads, 1, -1), values).view(bsz, heads, 1, -1).transpose(1, 2)
        return out.contiguous(), weights
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_groups = 1
        self.is_causal = True
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.window = config.layer_windows()[layer_idx]
        projection = self.num_heads * self.head_dim
        self.c_attn = QWenLinear(config.hidden_size, 3 * projection, bias=True)
        self.c_proj = QWenLinear(projection, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        rotated = rotary_qk(qkv[:, :, :2], *rotary) if q_len == 1 else None  # the C kernel (bf16 CPU)
        if rotated is None:
            rotated = apply_rotary(qkv[:, :, :2], *rotary)  # queries and keys in one pass
        query, key = rotated.unbind(dim=2)
        value = qkv[:, :, 2]
        if logn is not None:
            query = query * logn[:, :, None, None].to(query.dtype)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        if isinstance(past_key_values, Int8KVCache):
            # int8 KV cache (kv_cache.py): stores key/value and attends over the quantized cache
            interface = past_key_values.attention_interface(interface)
        elif past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if q_len == 1 and cpu_half_inference(query) and self.one_row_path_for(past_key_values):
            # One query row against the cache: torch's half-precision SDPA kernel is slow
            # there; plain attention is 2-4.5x faster. It runs in float32 (over a float32
            # copy of the cache) for a single sequence and on CPUs without native
            # bf16/fp16 matmuls; for batches on CPUs with them, in the model's dtype with
            # the softmax in float32, as the official code. Measured on a 2-core
            # AVX512-BF16 EPYC, 24 layers of a 1.8B model: one row at 150 keys 4.6 ms a
            # step in float32 vs 6.0 in bf16 (oneDNN's batched matmul reads a cache that
            # comes from memory at ~7 GB/s); 16 rows, where converting the cache costs
            # more than it saves, 0.34 s vs 0.31 s.
            # The C kernel of cpu_kernels.py (bf16, built on first use) attends in float32
            # straight from the bf16 cache: 2-4x faster than these torch paths.
            return self.c_proj(self.attend_one_row(query, key, value, attention_mask))
        out, _ = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.window,
            **kwargs,
        )
        return self.c_proj(out.reshape(bsz, q_len, -1))

    def one_row_path_for(self, cache: Cache | None) -> bool:
        """Whether one-query-row steps over ``cache`` may attend through
        :meth:`attend_one_row` instead of the configured interface: with SDPA selected,
        and not over the int8 cache (it attends through its own interface)."""
        return self.config._attn_implementation == "sdpa" and not isinstance(cache, Int8KVCache)

    def attend_one_row(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query row per sequence over the cache, half precision on CPU, no grad:
        (B, H, 1, d) -> (B, 1, H * d), through the C kernel where it applies."""
        bsz = query.shape[0]
        out = decode_attention(query, key, value, attention_mask, self.scaling)
        if out is not None:
            return out.reshape(bsz, 1, -1)
        dtype = query.dtype if bsz > 1 and cpu_has_native(query.dtype) else torch.float32
        out, _ = eager_attention(
            self, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, scaling=self.scaling
        )
        return out.to(query.dtype).reshape(bsz, 1, -1)


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if hidden_states.shape[:2] == (1, 1) and logn is None and past_key_values is not None:
            out = self.one_row_step(hidden_states, rotary, attention_mask, past_key_values)
            if out is not None:
                return out
        h = hidden_states + self.attn(self.ln_1(hidden_states), rotary, logn, attention_mask, past_key_values, **kwargs)
        return h + self.mlp(self.ln_2(h))

    def one_row_parts(self, cache: Cache) -> tuple | None:
        """What a one-row step in C kernels reads of this block, when every submodule is
        as built (no adapter, quantizer or hook; :func:`_as_built`), not training, SDPA
        selected and not the int8 cache: ``(attn, (ln_1 weight, eps), (c_attn weight,
        bias), (c_proj ...), (ln_2 weight, eps), (w1 ...), (w2 ...), (mlp c_proj ...))``;
        else None."""
        # Submodules and weights straight from the registries nn.Module.__getattr__ reads
        # (each attribute through it costs ~1 us, ~20 us a block, more after a product has
        # streamed its weights through the caches); each module's class and hooks checked.
        children = self._modules
        ln_1, attn, ln_2, mlp = children["ln_1"], children["attn"], children["ln_2"], children["mlp"]
        if self.training or not (_as_built(self) and _as_built(ln_1) and _as_built(attn) and _as_built(ln_2)):
            return None
        if not _as_built(mlp) or _global_module_hooks() or not attn.one_row_path_for(cache):
            return None
        linears = (attn._modules.get("c_attn"), attn._modules.get("c_proj"), *map(mlp._modules.get, _MLP_LINEARS))
        if not all(_as_built(module) for module in linears):
            return None
        c_attn, c_proj, w1, w2, mlp_proj = ((m._parameters["weight"], m._parameters["bias"]) for m in linears)
        norms = ((ln_1._parameters["weight"], ln_1.eps), (ln_2._parameters["weight"], ln_2.eps))
        return attn, norms[0], c_attn, c_proj, norms[1], w1, w2, mlp_proj

    def one_row_step(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor | None:
        """The block for one bf16 row on CPU (a one-sequence decoding step) in five C
        calls (cpu_kernels.py): ln_1 + c_attn + rotary; attention over the cache; c_proj
        + the residual; ln_2 + w1/w2 + gate; the MLP's c_proj + the residual. The same
        arithmetic as the modules, rounded at the same points; between the matrix
        products, whose weights stream through the CPU's caches, nothing is left for
        Python to do but the cache update. ``None`` (nothing done) unless
        :meth:`one_row_parts` has the block's parts and the kernels apply."""
        parts = self.one_row_parts(cache)
        if parts is None:
            return None
        attn, ln_1, c_attn, c_proj, ln_2, w1, w2, mlp_proj = parts
        qkv = qkv_row(x, ln_1, *c_attn, *rotary, attn.num_heads)
        if qkv is None:
            return None
        # (1, 1, 3, H, d) -> three (1, H, 1, d) views: for one row and one position the
        # same memory as the (B, H, q, d) transposes of the module path
        query, key, value = qkv.view(3, 1, attn.num_heads, 1, attn.head_dim).unbind(0)
        key, value = cache.update(key, value, attn.layer_idx)
        out = attn.attend_one_row(query, key, value, attention_mask)
        h = linear_row(out, *c_proj, residual=x)
        if h is None:
            h = x + attn.c_proj(out)
        gated = swiglu_row(h, *w1, *w2, norm=ln_2)
        if gated is None:
            return h + self.mlp(self.ln_2(h))
        out = linear_row(gated, *mlp_proj, residual=h)
        return h + self.mlp.c_proj(gated) if out is None else out


_MLP_LINEARS = ("w1", "w2", "c_proj")
_BUILT_CLASSES = frozenset({QWenLinear, QWenRMSNorm, QWenAttention, QWenMLP, QWenBlock})


# --------------------------------------------------------------------------- models


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` with the official precision flags.

        ``bf16=True``, ``fp16=True`` or ``fp32=True`` (or the same keys in
        ``config.json``) select the dtype; with none set, bf16 is used where CUDA supports
        it, else fp16 on CUDA, else fp32. ``dtype=``/``torch_dtype=`` also work. The
        config's ``use_flash_attn`` chooses flash-attention-2 when it can run, SDPA
        otherwise. Missing or unexpected weights raise ``ValueError``.
        """
        flags = {f: kwargs.pop(f) for f in PRECISION_FLAGS if f in kwargs}
        want_info = kwargs.pop("output_loading_info", False)
        dtype = kwargs.pop("dtype", None)
        legacy_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else legacy_dtype
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):  # a path, or None
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config, kwargs = QWenConfig.from_pretrained(
                config or pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
            )
            kwargs.update(hub)
        for flag, value in flags.items():
            setattr(config, flag, bool(value))
        config.validate_qwen()

        if isinstance(dtype, str) and dtype == "auto":  # as in transformers: the stored dtype
            dtype = None if config.precision_flag else stored_dtype(pretrained_model_name_or_path, config)
        dtype = _resolve_dtype(config, dtype, explicit_flags=any(flags.values()))
        if "attn_implementation" not in kwargs and config._attn_implementation_internal is None:
            kwargs["attn_implementation"] = _choose_attention(config, dtype, kwargs.get("device_map"))

        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            config=config,
            dtype=dtype,
            output_loading_info=True,
            **kwargs,
        )
        if getattr(config, "quantization_config", None) is None:
            problems = []
            for key, what in (
                ("missing_keys", "missing"),
                ("unexpected_keys", "unexpected"),
                ("mismatched_keys", "shape-mismatched"),
            ):
                names = sorted(str(k) for k in info.get(key) or ())
                if names:
                    shown = ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
                    problems.append(f"{what} weights: {shown}")
            if problems:
                raise ValueError(
                    f"checkpoint {pretrained_model_name_or_path!s} does not match the Qwen-1 layout "
                    f"({'; '.join(problems)}); refusing to run on randomly initialised weights"
                )
        if not huge_page_weights(model):
            map_cpu_weights(model)
        return (model, info) if want_info else model


class QWenModel(QWenPreTrainedModel):
    # loaded from a QWenLMHeadModel checkpoint (AutoModel), its output layer is not ours
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = QWenRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _position_ids(
        self,
        attention_mask: torch.Tensor | None,
        past_len: int,
        q_len: int,
        device: torch.device,
    ) -> torch.Tensor:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.clamp(min=0)[:, -q_len:].to(device)
        return (torch.arange(q_len, device=device) + past_len)[None, :]  # past_len: int or tensor

    def _ntk(self, position_ids: torch.Tensor, past_key_values: Cache | None, past_len: int, bsz: int):
        """Per-row dynamic-NTK alpha (B,), or None when the feature is off."""
        if not self.config.use_dynamic_ntk or self.training:
            return None
        if isinstance(past_len, torch.Tensor) and torch.compiler.is_compiling():
            # A compiled step over a static cache (its length a tensor): choose without
            # branching on it (the branch would break the graph).
            alpha = self._ntk_from_lengths(position_ids, bsz)
            fixed = ntk_alpha_of(past_key_values)
            if fixed is not None and fixed.shape[0] == bsz:
                alpha = torch.where(past_len == 0, alpha, fixed)
            set_ntk_alpha(past_key_values, alpha)
            return alpha
        if past_len == 0 or past_key_values is None:  # a sequence starts
            alpha = self._ntk_from_lengths(position_ids, bsz)
            if past_key_values is not None:
                set_ntk_alpha(past_key_values, alpha)
            return alpha
        alpha = ntk_alpha_of(past_key_values)
        if alpha is None or alpha.shape[0] != bsz:
            # A cache filled elsewhere (or reshaped): fall back to the current length.
            alpha = self._ntk_from_lengths(position_ids, bsz)
            set_ntk_alpha(past_key_values, alpha)
        return alpha

    def _ntk_from_lengths(self, position_ids: torch.Tensor, bsz: int) -> torch.Tensor:
        """Alpha (B,) from each row's own unpadded key length (its last position + 1)."""
        length = position_ids.max(dim=-1).values + 1
        return ntk_alpha(length, self.config.seq_length).expand(bsz).clone()

    def _masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        if isinstance(attention_mask, dict):
            return attention_mask
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_KWARG: past_key_values},
        )
        masks = {}
        for window in set(self.config.layer_windows()):
            if window is None or self.config._attn_implementation == "flash_attention_2":
                masks[window] = create_causal_mask(**kwargs)
            else:
                masks[window] = create_causal_mask(**kwargs, and_mask_function=sliding_window_overlay(window))
        return masks

    def _one_row_blocks(self, x: torch.Tensor, rotary: tuple, masks: list, cache: Cache | None) -> torch.Tensor | None:
        """A single-sequence bf16 decoding step through every block in one C call
        (:class:`~.cpu_kernels.BlockSteps`, which writes the step's keys and values into the
        cache's buffers itself): the same arithmetic as :meth:`QWenBlock.one_row_step`
        block by block, without the Python between the blocks' kernels, whose every
        operation runs from caches the weights have just streamed through. Needs a
        ``DynamicCache`` of :class:`~.kv_cache.GrowingLayer`s with something cached, every
        block's :meth:`QWenBlock.one_row_parts` and nothing else registered on the blocks;
        None (nothing done) otherwise."""
        if type(cache) is not DynamicCache or getattr(cache, "offloading", False) or type(self.h) is not nn.ModuleList:
            return None
        steps = BlockSteps(x, *rotary, self.config.num_attention_heads, self.config.kv_channels)
        if not steps.ok:
            return None
        layers, filled = cache.layers, []
        if len(masks) != len(self.h):
            return None
        for block, mask in zip(self.h._modules.values(), masks, strict=True):
            parts = block.one_row_parts(cache) if type(block) is QWenBlock else None
            if parts is None:
                return None
            attn, *weights = parts
            layer = layers[attn.layer_idx] if attn.layer_idx < len(layers) else None
            room = layer.room_for_one() if type(layer) is GrowingLayer else None
            if room is None or not steps.add(*weights, room[:2], room[2], mask, attn.scaling):
                return None
            filled.append((layer, room[2] + 1))
        if len({id(layer) for layer, _ in filled}) != len(filled):
            return None  # two blocks on one cache layer: not this model as built
        out = steps.run()
        if out is not None:
            for layer, length in filled:
                layer.filled(length)
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = make_cache(self.config)  # int8 with use_cache_quantization
        if not torch.is_grad_enabled():
            grow_in_place(past_key_values)
        bsz, q_len = inputs_embeds.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_len, q_len, inputs_embeds.device)
        position_ids = position_ids.expand(bsz, -1)

        alpha = self._ntk(position_ids, past_key_values, past_len, bsz)
        rotary = rotary_tables(*self.rotary_emb(position_ids, alpha))
        logn = None
        if self.config.use_logn_attn and not self.training:
            logn = logn_scale(position_ids, self.config.seq_length)
            if logn.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((logn > 1).any()):
                logn = None  # every factor is 1 (all positions within seq_length)
        masks = self._masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        windows = self.config.layer_windows()

        hidden_states = self.drop(inputs_embeds)
        all_hidden = [] if output_hidden_states else None
        blocks = self.h
        if (bsz, q_len) == (1, 1) and logn is None and all_hidden is None:
            out = self._one_row_blocks(hidden_states, rotary, [masks[w] for w in windows], past_key_values)
            if out is not None:
                hidden_states, blocks = out, ()
        for i, block in enumerate(blocks):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(
                hidden_states,
                rotary,
                logn,
                attention_mask=masks[windows[i]],
                past_key_values=past_key_values,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_KWARG: past_key_values if use_cache else None},
        )
        return _as_requested(output, return_dict, self.config)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin, QWenChatMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = QWenLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("output_attentions", None)
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            **{CACHE_KWARG: getattr(out, CACHE_KWARG)},
        )
        return _as_requested(output, return_dict, self.config)

    # ----------------------------------------------------------------- generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        use_int8_cache_for_generation(self.config, generation_config, model_kwargs)  # use_cache_quantization

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, position_ids=None, **kwargs) -> dict:
        """The attention masks ``generate`` builds ahead of the forward for static
        (compileable) caches: this model's own, one per window size in use (the generic
        one would drop ``window_size``)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return self.transformer._masks(inputs_embeds, attention_mask, cache, position_ids)

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """As ``GenerationMixin``'s, except that an explicit ``compile_config`` compiles the
        decoding steps on CPU too (``generate`` otherwise compiles only on accelerators)."""
        config = generation_config.compile_config
        if config is not None and self.device.type == "cpu" and config._compile_all_devices is None:
            config = dataclasses.replace(config)
            config._compile_all_devices = True
            generation_config.compile_config = config
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def get_compiled_call(self, compile_config):
        """``GenerationMixin``'s compiled forward. On CPU: with :data:`CPU_COMPILE_OPTIONS`
        added to the Inductor options (the ``mode``, if any, turned into its options), and
        one-row half-precision steps run inside :func:`onednn_off_for_one_row_step`."""
        compile_config = compile_config or self._default_compile_config()
        if self.device.type != "cpu":
            return super().get_compiled_call(compile_config)
        if compile_config.backend == "inductor":
            from torch._inductor import list_mode_options

            mode = {} if compile_config.mode is None else list_mode_options(compile_config.mode)
            options = {**mode, **CPU_COMPILE_OPTIONS, **(compile_config.options or {})}
            compile_config = dataclasses.replace(compile_config, mode=None, options=options)
        compiled = super().get_compiled_call(compile_config)
        half = self.dtype in (torch.bfloat16, torch.float16)

        @functools.wraps(compiled)
        def call(*args, **kwargs):
            inputs = kwargs.get("input_ids", args[0] if args else None)
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")[..., 0]
            if half and inputs.numel() == 1:
                with onednn_off_for_one_row_step():
                    return compiled(*args, **kwargs)
            return compiled(*args, **kwargs)

        return call

    def generate(self, inputs=None, generation_config=None, stopping_criteria=None, **kwargs):
        """``GenerationMixin.generate`` that also honours ``stop_words_ids`` (a list of
        token-id lists) from the call or from ``generation_config.stop_words_ids``."""
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None:
            config = generation_config if generation_config is not None else self.generation_config
            stop_words_ids = getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            stopping_criteria = StoppingCriteriaList(list(stopping_criteria or []))
            stopping_criteria.append(StopWordsCriteria(stop_words_ids))
        return super().generate(
            inputs, generation_config=generation_config, stopping_criteria=stopping_criteria, **kwargs
        )


def _resident_weights(model: nn.Module) -> list[torch.Tensor]:
    """The distinct CPU parameters and buffers a forward reads in full: all but the input
    embedding table (a forward reads a few of its rows) unless it doubles as the output
    layer."""
    seen = set()
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and (head is None or head.weight is not embeddings.weight):
        seen.add(embeddings.weight.data_ptr())
    tensors = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return tensors


def map_cpu_weights(model: nn.Module) -> None:
    """Touch one element per memory page of every CPU weight, so that weights memory-mapped
    from a safetensors file are mapped into this process now, at load, rather than page by
    page during the first forward (which then ran ~0.15 s slower on a 1.8B model: the
    first request of a server, the first reply of a chat). Reads ~1/2000 of the bytes;
    costs ~0.2 s for 3.4 GB of bf16 weights already in the page cache, or the disk read
    the first forward would otherwise do. The input embedding table is left alone
    (mapping it all would add its size to the resident set) unless it doubles as the
    output layer. Skipped where the weights exceed half the RAM (there the kernel must
    page them in and out anyway)."""
    tensors = [t.detach() for t in _resident_weights(model)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if not tensors or total > _ram_bytes() // 2:
        return
    with torch.no_grad():
        for t in tensors:
            if t.dim() == 1 or t.is_contiguous():  # a view as one row of elements, every page's first
                t.view(-1)[:: max(1, 4096 // t.element_size())].max()


HUGE_PAGES_ENV = "QWEN_HUGE_PAGES"
_HUGE_PAGE = 2 * 2**20
_RELEASE_BYTES = 32 * 2**20


def _transparent_huge_pages() -> bool:
    """Whether this is Linux with transparent huge pages available to ``madvise`` in this
    process (not switched off system-wide nor for the process, ``PR_SET_THP_DISABLE``)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        with open("/proc/self/status") as f:
            if any(line.split() == ["THP_enabled:", "0"] for line in f):
                return False
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _clean_file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of regular files in which no page
    was ever written (``Anonymous: 0 kB`` in /proc/self/smaps; Linux). Pages dropped there
    with ``MADV_DONTNEED`` come back from the file unchanged, whoever else reads them."""
    ranges = []
    try:
        f = open("/proc/self/smaps")  # noqa: SIM115
    except OSError:  # no /proc here: nothing is released, the copy still works
        return ranges
    current = None
    with f:
        for line in f:
            fields = line.split(maxsplit=5)
            if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                current = None
                if len(fields) == 6 and os.path.isfile(fields[5].rstrip("\n")):
                    current = tuple(int(x, 16) for x in fields[0].split("-"))
            elif current is not None and fields[:1] == ["Anonymous:"]:
                if fields[1] == "0":
                    ranges.append(current)
                current = None
    return ranges


def huge_page_empty_like(like: torch.Tensor) -> torch.Tensor:
    """An empty contiguous CPU tensor shaped as ``like``, in its own anonymous memory
    mapping advised for transparent huge pages and starting on a 2 MiB boundary (when it
    spans one). Its storage is its own, exactly its size, as for any tensor."""
    nbytes = like.numel() * like.element_size()
    spare = _HUGE_PAGE if nbytes >= _HUGE_PAGE else 0
    block = mmap.mmap(-1, nbytes + spare, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(block))
    offset = (-address) % _HUGE_PAGE if spare else 0
    # the tensor keeps ``block`` alive; the spare part before and after is never touched
    flat = torch.frombuffer(block, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(like.dtype).view(like.shape)


def huge_page_weights(model: nn.Module) -> int:
    """Move the CPU parameters a forward reads in full (:func:`_resident_weights`) into
    anonymous memory advised for transparent huge pages (Linux), each in its own mapping.
    Weights loaded from safetensors stay in the file's memory mapping, in 4 KiB pages;
    one-row decoding streams every weight once per token, and from 2 MiB pages it ran
    5-7% faster on a 2-core EPYC (1.8B bf16, three runs alternating step by step: 112
    ms a token against 118, 95 against 103, 89 against 96). The file pages each weight
    was copied from are handed back to the kernel (``MADV_DONTNEED`` on the pages wholly
    inside it) as it goes, so the resident set stays about the weights' size, as with
    the mapping (only in file mappings where no page was ever written: changes made
    there live nowhere else). The moved weights are private to the process (processes
    loading the same file no longer share it through the page cache). Costs a copy at
    load: 0.3 s for 3 GB where the kernel has huge pages at hand, 2-5 s on the virtual
    machine measured, where it had to find them. Nothing happens without transparent
    huge pages (system-wide or for the process), where the weights exceed half the RAM
    or the cgroup memory limit, or with ``QWEN_HUGE_PAGES=0`` (or false/off/no).
    Returns the bytes of the weights it took on, 0 where it did nothing (the caller maps
    them then); when no anonymous memory is left midway, the rest stay where they are
    and it maps them itself, with a warning."""
    if env_switched_off(HUGE_PAGES_ENV):
        return 0
    if not _transparent_huge_pages():
        return 0
    params = [t for t in _resident_weights(model) if isinstance(t, nn.Parameter)]
    total = sum(t.numel() * t.element_size() for t in params)
    if not params or total > _ram_bytes() // 2:
        return 0
    files = _clean_file_mappings()
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    with torch.no_grad():
        for param in params:
            old = param.data
            try:
                new = huge_page_empty_like(old)
            except OSError as error:  # say, a strict overcommit limit: the rest stay mapped
                logger.warning("weights left in place: no anonymous memory for a copy (%s)", error)
                map_cpu_weights(model)
                break
            start, size = old.data_ptr(), old.element_size()
            if not (old.is_contiguous() and any(a <= start and start + old.numel() * size <= b for a, b in files)):
                new.copy_(old)
            else:  # in pieces, each piece's file pages released once copied
                step = max(1, _RELEASE_BYTES // size)
                for i in range(0, old.numel(), step):
                    new.view(-1)[i : i + step].copy_(old.view(-1)[i : i + step])
                    lo, hi = start + i * size, start + min(old.numel(), i + step) * size
                    first, last = -(-lo // page) * page, hi // page * page
                    if last > first:
                        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
            param.data = new
    return total


def _ram_bytes() -> int:
    """Physical memory, or this process's cgroup memory limit where that is lower."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        ram = 2**62
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            ram = min(ram, int(value))
    return ram


_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
)


def _resolve_dtype(config: QWenConfig, dtype, explicit_flags: bool) -> torch.dtype:
    flag = config.precision_flag
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None and dtype != "auto":
        if explicit_flags and flag is not None and _DTYPE_OF_FLAG[flag] != dtype:
            raise ValueError(f"dtype={dtype} contradicts {flag}=True; pass only one of them")
        chosen = dtype
    elif flag is not None:
        chosen = _DTYPE_OF_FLAG[flag]
    elif torch.cuda.is_available():
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        chosen = torch.float32
    # Not written back as a precision flag: a checkpoint saved after an automatic choice
    # (fp32 on a CPU) must still choose for itself where it is loaded next.
    return chosen


def stored_dtype(checkpoint, config: QWenConfig | None = None) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its precision flag, else its
    config's ``dtype``, else that of the first tensor of its safetensors files; float32
    where none of them says bf16 or fp16 (``pytorch_model.bin`` checkpoints without
    either)."""
    from transformers.utils import cached_file

    if config is None:
        config = QWenConfig.from_pretrained(checkpoint)
    flag = config.precision_flag
    stored = _DTYPE_OF_FLAG[flag] if flag else getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored is None:
        found = None
        index = cached_file(checkpoint, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index is not None:
            with open(index) as f:
                shard = next(iter(json.load(f)["weight_map"].values()))
            found = cached_file(checkpoint, shard, _raise_exceptions_for_missing_entries=False)
        else:
            found = cached_file(checkpoint, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if found is not None:
            with open(found, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            tags = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
            stored = _SAFETENSORS_HALF.get(tags[0]) if tags else None
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


_SAFETENSORS_HALF = {"BF16": torch.bfloat16, "F16": torch.float16}


def _choose_attention(config: QWenConfig, dtype: torch.dtype, device_map) -> str:
    wanted = config.use_flash_attn
    if wanted is False:
        return "sdpa"
    reasons = []
    if importlib.util.find_spec("flash_attn") is None:
        reasons.append("the flash-attn package is not installed")
    if not torch.cuda.is_available() or device_map == "cpu":
        reasons.append("CUDA is not available")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"the model runs in {dtype}, not fp16/bf16")
    if not reasons:
        return "flash_attention_2"
    log = logger.warning if wanted is True else logger.info
    log("use_flash_attn=%r: using SDPA attention because %s", wanted, "; ".join(reasons))
    return "sdpa"
