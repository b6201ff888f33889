"""The first-generation Qwen network on current ``transformers``.

Computes the same function as the official remote code (``modeling_qwen.py`` of the
published checkpoints) under the state-dict names of those checkpoints, built like
transformers' own models: config -> norm -> rotary -> MLP -> attention -> block -> model
-> LM head, attention through the attention interface (SDPA, eager, flash-attention-2),
caches through ``Cache`` objects. What is Qwen-1's own: dynamic NTK fixed per sequence,
logN query scaling beyond the trained context, optional window attention per layer, the
official precision flags (``loading.py``) and the chat API (``qwen_generation_utils.py``).

Loading through ``from_pretrained`` also installs the CPU inference engine
(``cpu_engine.py``), which speeds up no-grad CPU inference through the extension points
below without changing a result.

This file belongs to a self-contained set that can be copied into a checkpoint directory
as remote code: it imports its siblings relatively and nothing else from this package.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import StoppingCriteriaList
from transformers.masking_utils import create_causal_mask, sliding_window_overlay
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .configuration_qwen import QWenConfig
from .kv_cache import CACHE_KWARG, Int8KVCache, grow_in_place, make_cache, use_int8_cache_for_generation
from .loading import check_loaded_keys, load_kwargs
from .qwen_generation_utils import QWenChatMixin, StopWordsCriteria

_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

# --------------------------------------------------------------------------- position features


def ntk_alpha(length: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Dynamic-NTK alpha for key lengths ``length``: ``max(2**ceil(log2(L/S) + 1) - 1, 1)``."""
    ratio = length.to(torch.float64) / seq_length
    alpha = torch.exp2(torch.ceil(torch.log2(ratio) + 1)) - 1
    return alpha.clamp(min=1.0)


# Dynamic-NTK alpha of each row of a cache, fixed when its sequence started (the cached
# keys were rotated with it): an attribute of the cache object, so that copies of a cache
# (copy.deepcopy of a prompt cache) keep it.
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
    ``x * cos + cat(x2, x1) * cat(-sin1, sin2)``: the same numbers (negation is exact).
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


class QWenRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight
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
    """SwiGLU: ``c_proj(w1(x) * silu(w2(x)))`` (the official names; ``intermediate_size``
    is twice the width)."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, width, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


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
    # One query against a cache that is a view of a larger buffer (kv_cache.GrowingLayer):
    # 3-d products over B*H read it in place, where 4-d matmuls would copy it.
    in_place = q_len == 1 and all(t.shape[1] == heads and t.stride(0) == heads * t.stride(1) for t in (key, value))
    if in_place:
        keys, rows = key.view(bsz * heads, key.shape[2], dim), query.reshape(bsz * heads, 1, dim)
        # float32 (MKL): q K^T is the fast orientation; bf16/fp16 (oneDNN): K q
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
    weights = F.dropout(weights, p=dropout, training=module.training) if dropout else weights
    if in_place:
        values = value.view(bsz * heads, value.shape[2], value.shape[3])
        out = torch.bmm(weights.view(bsz * heads, 1, -1), values).view(bsz, heads, 1, -1)
    else:
        out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


# The attention functions of this file: transformers' registry (ALL_ATTENTION_FUNCTIONS)
# with room for local overrides that do not reach other models (an inference engine may
# register a faster SDPA for some inputs here).
QWEN_ATTENTION_FUNCTIONS = AttentionInterface()


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
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection, bias=True)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)

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
        query, key = apply_rotary(qkv[:, :, :2], *rotary).unbind(dim=2)  # queries and keys in one pass
        value = qkv[:, :, 2]
        if logn is not None:
            query = query * logn[:, :, None, None].to(query.dtype)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        implementation = self.config._attn_implementation
        interface: Callable = QWEN_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        if isinstance(past_key_values, Int8KVCache):
            # the int8 KV cache stores key/value itself and attends over the quantized cache,
            # through the library's function where it dequantizes (not a local override)
            fallback = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
            interface = past_key_values.attention_interface(fallback)
        elif past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
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
        h = hidden_states + self.attn(self.ln_1(hidden_states), rotary, logn, attention_mask, past_key_values, **kwargs)
        return h + self.mlp(self.ln_2(h))


# --------------------------------------------------------------------------- models


def _as_requested(output, return_dict: bool | None, config: PretrainedConfig):
    """``output`` as a tuple where ``return_dict`` (or, left out, ``config.return_dict``) is False."""
    wanted = config.return_dict if return_dict is None else return_dict
    return output if wanted else output.to_tuple()


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache passed under either name (``cache`` from transformers 5.24 on)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not two different ones")
    return cache


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
        otherwise (``loading.py``). Missing or unexpected weights raise ``ValueError``.
        """
        want_info = kwargs.pop("output_loading_info", False)
        kwargs = load_kwargs(pretrained_model_name_or_path, kwargs)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        check_loaded_keys(pretrained_model_name_or_path, model.config, info)
        from .cpu_engine import install  # the CPU inference engine's one installation point

        install(model)
        return (model, info) if want_info else model


class QWenModel(QWenPreTrainedModel):
    # loaded from a QWenLMHeadModel checkpoint (AutoModel), its output layer is not ours
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    # Extension point: a callable ``(model, hidden_states, rotary, logn, masks, cache)``
    # that runs a whole one-token (decoding) step through every block at once and returns the last
    # block's output, or None where it does not apply (then the blocks run one by one).
    # An inference engine sets it on an instance.
    decode_step: Callable | None = None

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

    def _position_ids(self, attention_mask, past_len, q_len: int, device: torch.device) -> torch.Tensor:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.clamp(min=0)[:, -q_len:].to(device)
        return (torch.arange(q_len, device=device) + past_len)[None, :]  # past_len: int or tensor

    def _ntk(self, position_ids: torch.Tensor, cache: Cache | None, past_len, bsz: int) -> torch.Tensor | None:
        """Per-row dynamic-NTK alpha (B,), fixed when a sequence starts; None when the feature is off."""
        if not self.config.use_dynamic_ntk or self.training:
            return None

        def from_lengths() -> torch.Tensor:  # from each row's own unpadded key length (its last position + 1)
            return ntk_alpha(position_ids.max(dim=-1).values + 1, self.config.seq_length).expand(bsz).clone()

        fixed = ntk_alpha_of(cache) if cache is not None else None
        fits = fixed is not None and fixed.shape[0] == bsz
        if isinstance(past_len, torch.Tensor) and torch.compiler.is_compiling():
            # a compiled step over a static cache (its length a tensor): choose without branching
            alpha = torch.where(past_len == 0, from_lengths(), fixed) if fits else from_lengths()
        elif cache is not None and past_len != 0 and fits:
            return fixed
        else:  # a sequence starts (or a cache filled elsewhere, or reshaped: from the current length)
            alpha = from_lengths()
        if cache is not None:
            set_ntk_alpha(cache, alpha)
        return alpha

    def _logn(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """LogN factors of the queries, or None where the feature is off or every factor is 1."""
        if not self.config.use_logn_attn or self.training:
            return None
        logn = logn_scale(position_ids, self.config.seq_length)
        if logn.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((logn > 1).any()):
            return None  # all positions within seq_length (checked on CPU only: elsewhere a sync)
        return logn

    def _masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """The attention mask for each window size in use (None: unlimited)."""
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
            grow_in_place(past_key_values)  # append into spare room instead of copying the cache each step
        bsz, q_len = inputs_embeds.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_len, q_len, inputs_embeds.device)
        position_ids = position_ids.expand(bsz, -1)

        rotary = rotary_tables(*self.rotary_emb(position_ids, self._ntk(position_ids, past_key_values, past_len, bsz)))
        logn = self._logn(position_ids)
        masks = self._masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        layer_masks = [masks[window] for window in self.config.layer_windows()]

        hidden_states = self.drop(inputs_embeds)
        all_hidden = [] if output_hidden_states else None
        blocks = self.h
        if self.decode_step is not None and q_len == 1 and all_hidden is None:
            out = self.decode_step(self, hidden_states, rotary, logn, layer_masks, past_key_values)
            if out is not None:
                hidden_states, blocks = out, ()
        for block, mask in zip(blocks, layer_masks, strict=False):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            # every input but the hidden states by keyword: quantizers (optimum, gptqmodel) replay a
            # block with the hidden states and the keyword arguments they captured only
            hidden_states = block(
                hidden_states, rotary=rotary, logn=logn, attention_mask=mask, past_key_values=past_key_values, **kwargs
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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        use_int8_cache_for_generation(self.config, generation_config, model_kwargs)  # int8 with use_cache_quantization

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, position_ids=None, **kwargs) -> dict:
        """The attention masks ``generate`` builds ahead of the forward for static
        (compileable) caches: this model's own, one per window size in use (the generic
        one would drop ``window_size``)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return self.transformer._masks(inputs_embeds, attention_mask, cache, position_ids)

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
