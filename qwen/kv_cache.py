"""int8 KV cache: keys and values stored as uint8 with a scale and zero point per head vector.

``QWenConfig(use_cache_quantization=True)`` (or the same key in ``config.json``, or
``from_pretrained(..., use_cache_quantization=True)``) makes the model cache its keys and
values in an :class:`Int8KVCache` instead of a float ``DynamicCache``.

Quantization is asymmetric min-max over each head vector: for every batch row, head
and token, the ``head_dim`` values ``x`` are stored as ``q = round((x - zero) / scale)``
in ``0..255`` with ``zero = min(x)`` and ``scale = (max(x) - min(x)) / 255``, and read
back as ``q * scale + zero``. The error is at most half a step (``scale / 2``) per
element. ``scale`` and ``zero`` are kept once per vector, in the cache's float dtype,
in a ``(batch, heads, tokens, 2)`` tensor next to the ``(batch, heads, tokens, head_dim)``
uint8 tensor: for head_dim 128 and a bf16 model that is 132 bytes per vector instead
of 256 (0.516x).

The official Qwen code instead quantizes each forward call's keys with one scale per
(row, head) over all of its tokens and truncates; per-token scales with rounding are
several times more accurate (see ``docs/kv_cache.md``), and they make every row's
cache independent of what else is in the batch (padding included).

Attention. The first call of a sequence (the prompt) attends over its own float keys
and values with the model's attention implementation (SDPA, eager or
flash-attention-2) and stores them quantized. Later calls attend over the quantized
cache, the new tokens included:

* ``use_cache_kernel=True`` on CUDA with Triton installed: fused Triton kernels
  (``kv_cache_kernels.py``) that dequantize in registers for ``q @ k^T`` and
  ``p @ v``; no float copy of the cache is made.
* otherwise (CPU, Triton missing, or ``use_cache_kernel=False``): the cache is
  dequantized to the model dtype and handed to the model's attention implementation.
  A notice is logged once when the kernels were asked for but cannot run.

This file belongs to the self-contained remote-code set: it imports only torch,
transformers and its siblings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

logger = logging.getLogger(__name__)

QMAX = 255
# Dequantization works through the cache in slices of this many tokens, so that the
# float32 intermediates stay small next to the result.
_DEQUANT_CHUNK = 2048
_NOTICES: set[str] = set()


def _notice_once(level: int, message: str, *args) -> None:
    key = message % args
    if key not in _NOTICES:
        _NOTICES.add(key)
        logger.log(level, message, *args)


# --------------------------------------------------------------------------- quantization


def param_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the stored scale and zero point: the cache's float dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _round_down(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exact`` (float32) cast to ``dtype`` so that the stored value is <= ``exact``."""
    stored = exact.to(dtype)
    finfo = torch.finfo(dtype)
    lower = (exact - exact.abs() * finfo.eps - finfo.tiny).to(dtype)
    return torch.where(stored.float() > exact, lower, stored)


def _round_up(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exact`` (float32, >= 0) cast to ``dtype`` so that the stored value is >= ``exact``."""
    stored = exact.to(dtype)
    finfo = torch.finfo(dtype)
    higher = (exact * (1 + finfo.eps) + finfo.tiny).to(dtype)
    return torch.where(stored.float() < exact, higher, stored)


def quantize_kv(x: torch.Tensor, param_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., head_dim) to uint8 over its last dimension.

    Returns ``(q, params)``: ``q`` uint8 of the shape of ``x``, ``params`` of shape
    (..., 2) holding ``scale`` and ``zero`` in ``param_dtype`` (default: the float dtype
    of ``x``). ``x`` is encoded with the stored (rounded) ``scale`` and ``zero`` and
    rounded to nearest, so ``|x - dequantize_kv(q, params)| <= scale / 2``.
    """
    pdtype = param_dtype or param_dtype_for(x.dtype)
    xf = x.float()
    lo, hi = torch.aminmax(xf, dim=-1, keepdim=True)
    zero = _round_down(lo, pdtype)
    zero_f = zero.float()
    scale = _round_up(((hi - zero_f) / QMAX).clamp(min=torch.finfo(pdtype).tiny), pdtype)
    q = torch.round((xf - zero_f) / scale.float()).clamp_(0, QMAX).to(torch.uint8)
    return q, torch.cat((scale, zero), dim=-1)


def dequantize_kv(q: torch.Tensor, params: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``q * scale + zero`` (computed in float32) in ``dtype`` (default: the dtype of ``params``)."""
    dtype = dtype or params.dtype
    n = q.shape[-2] if q.dim() >= 2 else 0
    if q.dim() < 2 or n <= _DEQUANT_CHUNK:
        p = params.float()
        return torch.addcmul(p[..., 1:], q.float(), p[..., :1]).to(dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for start in range(0, n, _DEQUANT_CHUNK):
        sl = slice(start, start + _DEQUANT_CHUNK)
        p = params[..., sl, :].float()
        out[..., sl, :] = torch.addcmul(p[..., 1:], q[..., sl, :].float(), p[..., :1])
    return out


# --------------------------------------------------------------------------- cache


class Int8KVLayer(CacheLayerMixin):
    """One layer of an :class:`Int8KVCache`.

    ``key_q``/``value_q``: uint8 (batch, heads, tokens, head_dim); ``key_p``/``value_p``:
    (batch, heads, tokens, 2) scale and zero point in the cache's float dtype. The
    ``keys``/``values`` attributes of the base class stay ``None``: no float copy is kept.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.key_q = self.key_p = self.value_q = self.value_p = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.param_dtype = param_dtype_for(self.dtype)
        b, h, _, d = key_states.shape
        self.key_q = torch.empty((b, h, 0, d), dtype=torch.uint8, device=self.device)
        self.value_q = torch.empty((b, h, 0, value_states.shape[-1]), dtype=torch.uint8, device=self.device)
        self.key_p = torch.empty((b, h, 0, 2), dtype=self.param_dtype, device=self.device)
        self.value_p = torch.empty((b, h, 0, 2), dtype=self.param_dtype, device=self.device)
        self.is_initialized = True

    # ---- storage

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.key_q, self.key_p, self.value_q, self.value_p)

    def _set(self, tensors) -> None:
        self.key_q, self.key_p, self.value_q, self.value_p = tensors

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize (batch, heads, new_tokens, head_dim) keys and values onto the end."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, kp = quantize_kv(key_states, self.param_dtype)
        vq, vp = quantize_kv(value_states, self.param_dtype)
        if self.key_q.shape[-2] == 0:
            self._set((kq, kp, vq, vp))
        else:
            self._set(torch.cat((old, new), dim=-2) for old, new in zip(self._tensors(), (kq, kp, vq, vp), strict=True))

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values as float tensors (a fresh copy)."""
        dtype = dtype or self.dtype
        return dequantize_kv(self.key_q, self.key_p, dtype), dequantize_kv(self.value_q, self.value_p, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the storages held (uint8 data plus scales and zero points)."""
        if not self.is_initialized:
            return 0
        seen, total = set(), 0
        for t in self._tensors():
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    # ---- CacheLayerMixin API

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generic ``Cache`` API: store, then return all cached keys and values dequantized."""
        self.append(key_states, value_states)
        return self.dequantized(key_states.dtype)

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.key_q.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_q = self.key_p = self.value_q = self.value_p = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove from the end of the cache"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        # Copies, so that the memory of the dropped tokens is released.
        self._set(t[..., :keep, :].clone() for t in self._tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the quantized bytes are reordered as they are (exact)."""
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._set(t.index_select(0, idx) for t in self._tensors())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._set(t.repeat_interleave(repeats, dim=0) for t in self._tensors())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._set(t[indices, ...] for t in self._tensors())

    def offload(self) -> None:
        if self.is_initialized:
            self._set(t.to("cpu", non_blocking=True) for t in self._tensors())

    def prefetch(self) -> None:
        if self.is_initialized and self.key_q.device != self.device:
            self._set(t.to(self.device, non_blocking=True) for t in self._tensors())


class Int8KVCache(Cache):
    """A ``Cache`` that stores keys and values as uint8 with a scale and zero point per
    (batch row, head, token); see the module docstring.

    ``config``: a :class:`QWenConfig` (gives the layer count and ``use_cache_kernel``).
    ``use_kernel`` overrides ``config.use_cache_kernel``.

    Through the generic ``Cache.update`` API it behaves like a ``DynamicCache`` whose
    contents went through int8 (``update`` returns the dequantized keys and values). The
    Qwen attention instead calls :meth:`attention_interface`, which attends over the
    quantized cache without keeping a float copy.
    """

    def __init__(self, config=None, use_kernel: bool | None = None, num_layers: int | None = None):
        if num_layers is None and config is not None:
            num_layers = config.num_hidden_layers
        if num_layers:
            super().__init__(layers=[Int8KVLayer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=Int8KVLayer)
        if use_kernel is None:
            use_kernel = bool(getattr(config, "use_cache_kernel", False))
        self.use_kernel = bool(use_kernel)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers (uint8 data, scales and zero points)."""
        return sum(layer.nbytes for layer in self.layers)

    def _layer(self, layer_idx: int) -> Int8KVLayer:
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx]

    # ---- attention

    def attention_interface(self, fallback: Callable) -> Callable:
        """An attention function with the signature of ``ALL_ATTENTION_FUNCTIONS``
        entries (``module, query, key, value, attention_mask, **kwargs``) that stores
        ``key``/``value`` in layer ``module.layer_idx`` and attends over the quantized
        cache. ``fallback`` is the model's own attention function (used for the prompt
        and, on the torch path, over the dequantized cache)."""

        def attend(module, query, key, value, attention_mask, **kwargs):
            return self._attend(fallback, module, query, key, value, attention_mask, **kwargs)

        return attend

    def _attend(self, fallback, module, query, key, value, attention_mask, **kwargs):
        layer = self._layer(module.layer_idx)
        first = layer.get_seq_length() == 0
        layer.append(key, value)
        if first:
            # The prompt: its float keys and values are at hand, so attend over them exactly.
            return fallback(module, query, key, value, attention_mask, **kwargs)
        dropout = kwargs.get("dropout", 0.0) or 0.0
        if self._kernel_usable(query, dropout):
            from .kv_cache_kernels import int8_attention

            scaling = kwargs.get("scaling")
            out = int8_attention(
                query,
                layer.key_q,
                layer.key_p,
                layer.value_q,
                layer.value_p,
                attention_mask=attention_mask,
                scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
                window=kwargs.get("sliding_window"),
            )
            return out, None
        k, v = layer.dequantized(query.dtype)
        return fallback(module, query, k, v, attention_mask, **kwargs)

    def _kernel_usable(self, query: torch.Tensor, dropout: float) -> bool:
        if not self.use_kernel:
            _notice_once(
                logging.INFO,
                "int8 KV cache: attention dequantizes the cache in torch (use_cache_kernel=False)",
            )
            return False
        from .kv_cache_kernels import unavailable_reason

        reason = unavailable_reason(query.device)
        if reason is None and dropout > 0:
            reason = "attention dropout is active (training mode)"
        if reason is not None:
            _notice_once(
                logging.WARNING,
                "int8 KV cache: use_cache_kernel=True but the Triton kernels cannot run (%s); "
                "attention dequantizes the cache in torch instead",
                reason,
            )
            return False
        return True


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare room instead of re-concatenating.

    ``DynamicLayer.update`` copies the whole cached key and value tensors on every step
    (``torch.cat``), so a decoding step costs time in proportion to the context. This
    layer keeps them in buffers with room for ``max(GROWING_MIN_ROOM, length // 4)`` more
    positions and exposes ``keys``/``values`` as views of the filled part; a step writes
    only its own positions. Anything that replaces ``keys``/``values`` (row selection,
    cropping, reordering) works as with ``DynamicLayer``: the next update starts new
    buffers from what it finds.
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def _room(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Make sure the buffers hold what is cached and have room for ``key_states``'
        positions after it (new buffers, ``keys``/``values`` pointed at them, where they do
        not); returns the number of positions cached."""
        keys, values = self.keys, self.values
        old = keys.shape[-2] if keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        buffer = self._key_buffer
        ours = (
            buffer is not None
            and old > 0
            and keys.data_ptr() == buffer.data_ptr()
            and keys.stride() == buffer.stride()
            and values.data_ptr() == self._value_buffer.data_ptr()
            and keys.shape[:2] == key_states.shape[:2] == buffer.shape[:2]
        )
        if not ours or new > buffer.shape[-2]:
            room = new + max(GROWING_MIN_ROOM, new // 4)
            self._key_buffer = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            self._value_buffer = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if old:
                self._key_buffer[..., :old, :].copy_(keys)
                self._value_buffer[..., :old, :].copy_(values)
                self.filled(old)
        return old

    def filled(self, length: int) -> None:
        """Point ``keys``/``values`` at the buffers' first ``length`` positions."""
        self.keys = self._key_buffer.narrow(-2, 0, length)
        self.values = self._value_buffer.narrow(-2, 0, length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self._room(key_states, value_states)
        new = old + key_states.shape[-2]
        self._key_buffer[..., old:new, :].copy_(key_states)
        self._value_buffer[..., old:new, :].copy_(value_states)
        self.filled(new)
        return self.keys, self.values

    def room_for_one(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For a one-position step that writes the cache itself (``cpu_kernels.BlockSteps``):
        the key and value buffers, with room for one more position, and that position
        (what is cached is kept); :meth:`filled` with one more then takes the row in.
        None while nothing is cached."""
        if not self.is_initialized or self.keys.dim() != 4 or self.keys.shape[-2] == 0:
            return None
        position = self._room(self.keys.narrow(-2, 0, 1), self.values.narrow(-2, 0, 1))
        return self._key_buffer, self._value_buffer, position

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


# Spare positions a GrowingLayer allocates at least (a 16-row batch of a 1.8B model: 200 MB
# for all layers); the cache is copied once per this many steps instead of every step.
GROWING_MIN_ROOM = 64


def grow_in_place(cache: Cache | None) -> None:
    """Turn the plain ``DynamicLayer``s of a ``DynamicCache`` (and the ones it will add)
    into :class:`GrowingLayer`s, keeping their contents: no-grad decoding then stops
    copying the whole cache on every step. Other caches are left alone."""
    if type(cache) is not DynamicCache:
        return
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer


# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
# ``cache`` (the old name still works there, with a warning, until 5.40). Models, masks
# and ``generate`` use whichever name the installed version has.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def make_cache(config) -> Cache:
    """The cache a Qwen model uses when none is given: int8 when ``config.use_cache_quantization``."""
    if getattr(config, "use_cache_quantization", False):
        return Int8KVCache(config=config)
    return DynamicCache(config=config)


def use_int8_cache_for_generation(config, generation_config, model_kwargs: dict) -> None:
    """Replace the ``DynamicCache`` that ``GenerationMixin`` made by an :class:`Int8KVCache`
    when ``config.use_cache_quantization`` is set. A cache passed by the caller, or one
    asked for through ``cache_implementation`` (static, offloaded, quantized, ...), is kept."""
    if not getattr(config, "use_cache_quantization", False):
        return
    cache = model_kwargs.get(CACHE_KWARG)
    if type(cache) is not DynamicCache or getattr(cache, "_is_user_defined", False):
        return
    if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
        return
    if getattr(generation_config, "is_assistant", False):
        return
    model_kwargs[CACHE_KWARG] = Int8KVCache(config=config)
