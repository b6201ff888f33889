"""The CPU inference engine: faster no-grad CPU inference for a loaded Qwen-1 model.

:func:`install` (called once by ``from_pretrained``; call it yourself on a model built
otherwise) changes no result, only where and how the work runs, through the model's
extension points:

- **weights** move to transparent huge pages, or are mapped in from the file now
  (:func:`.cpu_memory.place_weights`);
- **modules** of the model's own classes become their CPU subclasses (same parameters,
  same state dict, hooks kept): :class:`CPULinear` (one half-precision row through the C
  matrix-vector product, else torch's GEMV with oneDNN off; several rows through a
  oneDNN-packed weight after :func:`pack_for_cpu_batches`, or in float32 where the CPU has
  no native half-precision matmul), :class:`CPURMSNorm` (the C norm) and :class:`CPUMLP`
  (both products and the gate of one row in one C call);
- **GPTQ linears**: gptqmodel's ``TorchLinear`` modules (the ``gptq_torch`` backend) take
  inference through the C kernels on their packed int2/4/8 weights (:class:`CPUGPTQLinear`,
  ``gptq_kernels.py``);
- **attention**: one query row per sequence over the cache, in half precision, goes
  through the C kernel (or float32 attention) instead of torch's SDPA, registered as this
  model file's local ``"sdpa"`` (``modeling_qwen.QWEN_ATTENTION_FUNCTIONS``);
- **the decoding step**: a single-sequence bf16 step runs through every block in one C
  call (:func:`decode_all_blocks`, the model's ``decode_step`` hook; bf16 or GPTQ linears),
  writing its keys and values into the cache's buffers, with no Python between the blocks;
- **compiled generation** (``generate(compile_config=...)``) also compiles on CPU, with
  Inductor options that suit CPU decoding, one-row steps run with oneDNN off.

Every path checks its inputs on each call and falls back to the plain module's code where
it does not apply (autograd, other devices or dtypes, adapters or quantizers in place of
the model's own modules, hooks). ``QWEN_CPU_KERNELS=0`` turns the C kernels off
(``cpu_kernels.py``), ``QWEN_HUGE_PAGES=0`` the huge pages. Measurements:
docs/performance.md.

Part of the self-contained remote-code set: imports its siblings relatively only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cpu_kernels import (
    BlockParts,
    BlockSteps,
    Norm,
    Product,
    QuantProduct,
    decode_attention,
    linear_row,
    rms_norm,
    swiglu_row,
)
from .cpu_memory import place_weights
from .gptq_kernels import quant_linear, quant_product, row_function
from .kv_cache import GrowingLayer
from .modeling_qwen import (
    QWEN_ATTENTION_FUNCTIONS,
    QWenAttention,
    QWenBlock,
    QWenMLP,
    QWenRMSNorm,
    eager_attention,
)

# From this many rows on, no-grad half-precision CPU products run in float32 on CPUs
# without native bf16/fp16 matmuls (torch's kernel costs about one matrix-vector product
# per row there), converting the weight a block of this many bytes at a time.
CPU_FP32_MIN_ROWS = 4
CPU_FP32_BLOCK_BYTES = 8 * 2**20

# Inductor options for compiled CPU decoding: realizing every intermediate of more than 4
# operations keeps it from recomputing the query's rotary embedding once per key inside
# the attention's reduction.
CPU_COMPILE_OPTIONS = {"realize_opcount_threshold": 4}


def _cpu_native_probe(dtype: torch.dtype) -> bool:
    probes = (
        ("_is_amx_fp16_supported",)
        if dtype == torch.float16
        else ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# Probed once at import: torch.compile cannot trace the probes.
_CPU_NATIVE = {dtype: _cpu_native_probe(dtype) for dtype in (torch.bfloat16, torch.float16)}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul has hardware support for ``dtype`` here."""
    return _CPU_NATIVE.get(dtype, False)


def cpu_half_inference(x: torch.Tensor) -> bool:
    """No-grad inference on half-precision (bf16/fp16) CPU tensors."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()


# --------------------------------------------------------------------------- products


def cpu_half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for half-precision CPU tensors, accumulated in float32.

    The weight is converted ``CPU_FP32_BLOCK_BYTES`` at a time into a buffer that stays in
    cache; each block's outputs are computed as ``block @ x.T`` into rows of a transposed
    float32 result, rounded once. Products of half-precision numbers are exact in float32,
    so only the order of the sums differs from torch's kernel.
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


def cpu_one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for one half-precision CPU row through torch's GEMV, not oneDNN's (whose
    matrix-vector product reads the weight slower on CPUs with native bf16)."""
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


# Under torch.compile the oneDNN switch cannot be traced; as an opaque operator it stays one
# call inside the graph. Registered once per process (a copy of this file loaded as remote
# code next to this package reuses it).
if hasattr(torch.library, "custom_op") and not hasattr(torch.ops.qwen, "one_row_linear"):
    torch.library.custom_op("qwen::one_row_linear", mutates_args=())(cpu_one_row_linear).register_fake(
        _one_row_linear_fake
    )

# True while compiled one-row steps run with oneDNN switched off as a whole
# (:func:`onednn_off_for_one_row_step`): their products then trace as plain F.linear. Steps
# in several threads share the switch: the first to start turns it off, the last to end
# restores it.
_onednn_off_for_step = False
_one_row_steps = 0
_onednn_before_steps = True
_one_row_steps_lock = threading.Lock()


@contextlib.contextmanager
def onednn_off_for_one_row_step():
    """Switch oneDNN off around a compiled one-row CPU step and let the step trace its
    one-row products as plain ``F.linear``."""
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


def _weight_key(weight: torch.Tensor) -> tuple:
    """What tells a packed copy that its weight changed: in-place writes bump the version;
    ``model.to(...)`` and assigning ``.data`` change the storage, dtype or shape. Writes
    through ``.data`` in place are invisible: pack again after them (peft's ``merge_and_unload``)."""
    return (weight._version, weight.data_ptr(), weight.dtype, weight.shape)


# --------------------------------------------------------------------------- modules


class CPULinear(nn.Linear):
    """``nn.Linear`` with faster no-grad half-precision CPU paths (see the module docstring)."""

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


class CPURMSNorm(QWenRMSNorm):
    """The model's RMSNorm through the C kernel for bf16 inference on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rms_norm(x, self.weight, self.eps)
        return super().forward(x) if out is None else out


class CPUMLP(QWenMLP):
    """The MLP with one bf16 row's ``w1(x) * silu(w2(x))`` in one C call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self._modules["w1"], self._modules["w2"]
        if _as_built(w1) and _as_built(w2):
            gated = swiglu_row(x, w1.weight, w1.bias, w2.weight, w2.bias)
            if gated is not None:
                return self.c_proj(gated)
        return super().forward(x)


_SWAPS = {nn.Linear: CPULinear, QWenRMSNorm: CPURMSNorm, QWenMLP: CPUMLP}
_BUILT_CLASSES = frozenset({CPULinear, CPURMSNorm, CPUMLP, QWenAttention, QWenBlock})


def _plain_call(module: nn.Module) -> bool:
    """No hooks, no patched forward and not compiled on its own (``module.compile()``):
    calling ``module`` runs exactly its class's code."""
    return (
        not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
        and module._compiled_call_impl is None
    )


def _as_built(module: nn.Module | None) -> bool:
    """A module of the engine's installed classes (not replaced by an adapter's or
    quantizer's) whose call runs exactly that class's code."""
    return type(module) in _BUILT_CLASSES and _plain_call(module)


def pack_for_cpu_batches(model: nn.Module, rows: int) -> int:
    """Give each half-precision CPU :class:`CPULinear` of ``model`` a oneDNN-packed copy of
    its weight, laid out for products of about ``rows`` rows; no-grad products of 2 to
    ``2 * rows`` rows then use it (the same results, faster batched decoding). One-row
    products and long prefills keep the plain weight, so this costs a second copy of the
    weights; a weight changed in place or replaced drops its copy (not a write through
    ``.data``: pack after merging adapters). Does nothing where CPU bf16/fp16 matmuls are
    not native. Returns the bytes added."""
    added = 0
    with torch.no_grad():
        for module in model.modules():
            weight = module.weight if isinstance(module, CPULinear) else None
            if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
                continue
            if not cpu_has_native(weight.dtype):
                continue
            module._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            module._packed_key = _weight_key(weight)
            module._packed_rows = rows
            added += weight.numel() * weight.element_size()
    return added


# --------------------------------------------------------------------------- GPTQ linears


class CPUGPTQLinear:
    """Mixed into gptqmodel's ``TorchLinear`` (the ``gptq_torch`` backend) by :func:`install`:
    inference goes through the C kernels on the packed weights (one row: the one-row
    product; several: the weight dequantized to float32 a block at a time and torch's
    product, :func:`.gptq_kernels.quant_linear`); training and adapters through the
    library's code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # gptqmodel's code fails obscurely on it
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension is {x.shape[-1] if x.dim() else 'missing'} "
                f"(shape {tuple(x.shape)}); this layer takes {self.in_features} features"
            )
        out = quant_linear(self, x)
        return super().forward(x) if out is None else out


@functools.cache
def _gptq_row_class(base: type) -> type:
    return type(f"CPU{base.__name__}", (CPUGPTQLinear, base), {"__module__": __name__})


def _gptq_swap(cls: type) -> type | None:
    """The class a gptqmodel quant linear of exactly ``cls`` becomes, or None. gptqmodel is
    not imported here: a model holding its modules has imported it already."""
    torch_backend = sys.modules.get("gptqmodel.nn_modules.qlinear.torch")
    return _gptq_row_class(cls) if torch_backend is not None and cls is torch_backend.TorchLinear else None


# --------------------------------------------------------------------------- attention


def one_row_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, except for one query row per sequence in half precision on CPU without grad
    (a decoding step), where torch's half-precision SDPA kernel is slow: there the C
    kernel attends in float32 straight from the bf16 cache; without it, plain attention
    runs in float32 (or, for batches on CPUs with native half-precision matmuls, in the
    model's dtype with the softmax in float32)."""
    if query.shape[2] != 1 or not cpu_half_inference(query) or not isinstance(module, QWenAttention):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = decode_attention(query, key, value, attention_mask, module.scaling)
    if out is None:
        bsz = query.shape[0]
        dtype = query.dtype if bsz > 1 and cpu_has_native(query.dtype) else torch.float32
        out, _ = eager_attention(
            module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, scaling=module.scaling
        )
        out = out.to(query.dtype)
    return out, None


# --------------------------------------------------------------------------- decoding step


def _global_module_hooks() -> bool:
    """Whether forward hooks for every module are registered (``register_module_forward_hook``)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def _block_parts(block: nn.Module) -> BlockParts | None:
    """What the all-blocks C call reads of ``block``, when it and every submodule are as
    built (no adapter, quantizer or hook) and it is not training; else None."""
    # Submodules and weights from the registries nn.Module.__getattr__ reads (each
    # attribute through it costs about a microsecond, a block's dozens add up).
    children = block._modules
    if block.training or not _as_built(block):
        return None
    ln_1, attn, ln_2, mlp = children["ln_1"], children["attn"], children["ln_2"], children["mlp"]
    if not (_as_built(ln_1) and _as_built(attn) and _as_built(ln_2) and _as_built(mlp)):
        return None
    linears = (attn._modules.get("c_attn"), attn._modules.get("c_proj"), *map(mlp._modules.get, ("w1", "w2", "c_proj")))
    products = [_product(module) for module in linears]
    if any(product is None for product in products):
        return None
    c_attn, c_proj, w1, w2, mlp_proj = products
    norm_1, norm_2 = (Norm(ln._parameters["weight"], ln.eps) for ln in (ln_1, ln_2))
    return BlockParts(norm_1, c_attn, c_proj, norm_2, w1, w2, mlp_proj, attn.scaling)


def _product(module: nn.Module | None) -> Product | QuantProduct | None:
    """A linear's weights for the all-blocks step: a built ``CPULinear``'s bf16 weight, or a
    GPTQ linear's packed tensors where its one-row product goes through the GPTQ kernel."""
    if _as_built(module):
        return Product(module._parameters["weight"], module._parameters["bias"])
    if isinstance(module, CPUGPTQLinear) and _plain_call(module):
        return quant_product(module)
    return None


def decode_all_blocks(model, x: torch.Tensor, rotary: tuple, logn, masks: list, cache: Cache | None):
    """``QWenModel.decode_step``: a single-sequence bf16 decoding step through every block in
    one C call (:class:`~.cpu_kernels.BlockSteps`, which writes the step's keys and values
    into the cache's buffers itself); the same arithmetic as the blocks one by one. Needs
    one token, no logN factor, SDPA selected, a ``DynamicCache`` of
    :class:`~.kv_cache.GrowingLayer`s with something cached, and every block as built (its
    linears bf16 ``CPULinear``s or GPTQ linears the GPTQ kernel takes); None (nothing done)
    otherwise."""
    if (
        x.shape[:2] != (1, 1)
        or logn is not None
        or type(cache) is not DynamicCache
        or getattr(cache, "offloading", False)
    ):
        return None
    if model.config._attn_implementation != "sdpa" or type(model.h) is not nn.ModuleList or _global_module_hooks():
        return None
    blocks = list(model.h._modules.values())
    steps = BlockSteps(x, *rotary, model.config.num_attention_heads, model.config.kv_channels)
    if not steps.ok or len(masks) != len(blocks):
        return None
    layers, filled = cache.layers, []
    for block, mask in zip(blocks, masks, strict=True):
        parts = _block_parts(block)
        if parts is None:
            return None
        if steps.gptq_row is None and any(isinstance(p, QuantProduct) for p in parts.products()):
            steps.gptq_row = row_function()  # the GPTQ kernel library, built on first use
        index = block._modules["attn"].layer_idx
        layer = layers[index] if index < len(layers) else None
        room = layer.room_for_one() if type(layer) is GrowingLayer else None
        if room is None or not steps.add(parts, room[0], room[1], room[2], mask):
            return None
        filled.append((layer, room[2] + 1))
    if len({id(layer) for layer, _ in filled}) != len(filled):
        return None  # two blocks on one cache layer: not this model as built
    out = steps.run()
    if out is not None:
        for layer, length in filled:
            layer.filled(length)
    return out


# --------------------------------------------------------------------------- compiled generation


def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
    """As ``GenerationMixin``'s, except that an explicit ``compile_config`` compiles the
    decoding steps on CPU too (``generate`` otherwise compiles only on accelerators)."""
    config = generation_config.compile_config
    if config is not None and self.device.type == "cpu" and config._compile_all_devices is None:
        config = dataclasses.replace(config)
        config._compile_all_devices = True
        generation_config.compile_config = config
    return type(self)._valid_auto_compile_criteria(self, model_kwargs, generation_config)  # the class's own


def get_compiled_call(self, compile_config):
    """``GenerationMixin``'s compiled forward; on CPU with :data:`CPU_COMPILE_OPTIONS` added
    to the Inductor options (the ``mode``, if any, turned into its options) and one-row
    half-precision steps run inside :func:`onednn_off_for_one_row_step`."""
    compile_config = compile_config or self._default_compile_config()
    if self.device.type != "cpu":
        return type(self).get_compiled_call(self, compile_config)  # the class's own
    if compile_config.backend == "inductor":
        from torch._inductor import list_mode_options

        mode = {} if compile_config.mode is None else list_mode_options(compile_config.mode)
        options = {**mode, **CPU_COMPILE_OPTIONS, **(compile_config.options or {})}
        compile_config = dataclasses.replace(compile_config, mode=None, options=options)
    compiled = type(self).get_compiled_call(self, compile_config)
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


# --------------------------------------------------------------------------- installation


def install(model: nn.Module) -> nn.Module:
    """Install the engine on a Qwen-1 model (a ``QWenLMHeadModel`` or ``QWenModel``) once:
    place its weights, swap its modules for their CPU subclasses, register the one-row
    attention, set the decoding-step hook and, for generation, the compiled-call hooks.
    Returns the model."""
    if getattr(model, "_qwen_cpu_engine", False):
        return model
    place_weights(model)
    for module in model.modules():
        swap = _SWAPS.get(type(module)) or _gptq_swap(type(module))
        if swap is not None:
            module.__class__ = swap
    QWEN_ATTENTION_FUNCTIONS["sdpa"] = one_row_sdpa
    getattr(model, "transformer", model).decode_step = decode_all_blocks
    if isinstance(model, GenerationMixin):
        model._valid_auto_compile_criteria = types.MethodType(_valid_auto_compile_criteria, model)
        model.get_compiled_call = types.MethodType(get_compiled_call, model)
    model._qwen_cpu_engine = True
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Give ``model``'s modules back their own classes and drop the decoding-step and
    compiled-call hooks (the placed weights stay where they are), for tools that look for
    modules of exactly the model's classes (optimum's GPTQ quantizer takes ``type(m) is
    nn.Linear`` only). :func:`install` puts the engine back. Returns the model."""
    if not getattr(model, "_qwen_cpu_engine", False):
        return model
    plain = {swap: base for base, swap in _SWAPS.items()}
    for module in model.modules():
        base = plain.get(type(module)) or (type(module).__bases__[1] if isinstance(module, CPUGPTQLinear) else None)
        if base is not None:
            module.__class__ = base
            module.__dict__.pop("_packed", None)
    getattr(model, "transformer", model).__dict__.pop("decode_step", None)
    for name in ("_valid_auto_compile_criteria", "get_compiled_call"):
        model.__dict__.pop(name, None)
    model._qwen_cpu_engine = False
    return model
