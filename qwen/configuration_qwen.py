"""Configuration of the first-generation Qwen models (model_type ``"qwen"``)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The keys of the official config.json files, with their defaults (Qwen-7B's values).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "kv_channels": None,  # None: hidden_size // num_attention_heads
    "intermediate_size": 22016,  # twice the MLP width, as in the official checkpoints
    "seq_length": 8192,  # the trained context; dynamic NTK and logN scaling act beyond it
    "max_position_embeddings": 8192,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "initializer_range": 0.02,
    "emb_dropout_prob": 0.0,
    "attn_dropout_prob": 0.0,
    "scale_attn_weights": True,
    "no_bias": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "use_flash_attn": "auto",
    "bf16": False,
    "fp16": False,
    "fp32": False,
    "softmax_in_fp32": False,
    "use_cache_quantization": False,
    "use_cache_kernel": False,
    "onnx_safe": None,
    "window_size": None,  # not in the official code: see QWenConfig
    "use_cache": True,
    # transformers 5 no longer declares these on every config; the official README
    # passes pad_token_id to from_pretrained, so they must exist to be overridden.
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels")
_INTS += ("intermediate_size", "seq_length", "max_position_embeddings")
_FLOATS = ("rotary_pct", "layer_norm_epsilon", "emb_dropout_prob", "attn_dropout_prob")
PRECISION_FLAGS = ("bf16", "fp16", "fp32")
_FLAGS = ("scale_attn_weights", "no_bias", "use_dynamic_ntk", "use_logn_attn", *PRECISION_FLAGS)
_FLAGS += ("softmax_in_fp32", "use_cache_quantization", "use_cache_kernel")

# The first Qwen-7B release used GPT-2/Megatron names: first-release key -> current key.
LEGACY_KEYS = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
    "n_positions": "max_position_embeddings",
    "attn_pdrop": "attn_dropout_prob",
    "embd_pdrop": "emb_dropout_prob",
    "tokenizer_type": "tokenizer_class",
}
# First-release keys describing the function, with the only value this network computes.
LEGACY_FIXED = {"activation": "swiglu", "pos_emb": "rotary", "apply_residual_connection_post_layernorm": False}
# First-release keys that change nothing at inference.
LEGACY_IGNORED = ("resid_pdrop", "bias_dropout_fusion", "fp32_residual_connection")
_PARAMS_DTYPE = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def migrate_legacy_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the first release's keys replaced by the current ones. A legacy value
    that disagrees with a non-default current one is an error, except that ``padded_vocab_size``
    wins over ``vocab_size`` and ``tokenizer_class`` over ``tokenizer_type``."""
    kwargs = dict(kwargs)
    for old, new in LEGACY_KEYS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if new == "tokenizer_class":
            kwargs.setdefault(new, value)
            continue
        current = kwargs.get(new, DEFAULTS[new])
        if new != "vocab_size" and current != DEFAULTS[new] and current != value:
            raise ValueError(
                f"config keys {old!r}={value!r} (first-release name) and {new!r}={current!r} "
                "disagree; remove one of them"
            )
        kwargs[new] = value
    for key, expected in LEGACY_FIXED.items():
        if key in kwargs and kwargs.pop(key) != expected:
            raise ValueError(
                f"config key {key!r} must be {expected!r} for a Qwen-1 model; this checkpoint "
                "describes a different architecture"
            )
    for key in LEGACY_IGNORED:
        kwargs.pop(key, None)
    params_dtype = kwargs.pop("params_dtype", None)
    if params_dtype is not None and not any(kwargs.get(flag) for flag in PRECISION_FLAGS):
        if str(params_dtype) not in _PARAMS_DTYPE:
            raise ValueError(f"config key 'params_dtype'={params_dtype!r} is not one of {sorted(_PARAMS_DTYPE)}")
        kwargs.update({flag: flag == _PARAMS_DTYPE[str(params_dtype)] for flag in PRECISION_FLAGS})
    return kwargs


class QWenConfig(PretrainedConfig):
    """Configuration for :class:`qwen.QWenLMHeadModel`: the keys of :data:`DEFAULTS`, plus the
    first release's names (see :func:`migrate_legacy_keys`). The MLP is ``intermediate_size // 2``
    wide. ``window_size`` limits every query to that many most recent keys: ``None`` (full causal
    attention), one int for all layers, or a list with one int (or ``None``) per layer."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"head_dim": "kv_channels", "num_key_value_heads": "num_attention_heads"}

    def __init__(self, **kwargs: Any):
        kwargs = migrate_legacy_keys(kwargs)
        for key, default in DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        if self.kv_channels is None:  # (a non-positive head count is reported by validate_qwen)
            self.kv_channels = int(self.hidden_size) // max(int(self.num_attention_heads), 1)
        for key in _INTS:
            setattr(self, key, int(getattr(self, key)))
        for key in _FLOATS:
            setattr(self, key, float(getattr(self, key)))
        for key in _FLAGS:  # JSON true/false (or 0/1), not Python truthiness ("no" would be true)
            if not (isinstance(getattr(self, key), int) and getattr(self, key) in (0, 1)):
                raise ValueError(f"config key {key}={getattr(self, key)!r} must be true or false")
            setattr(self, key, bool(getattr(self, key)))
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate_qwen()

    def validate_qwen(self) -> None:
        """Raise ``ValueError`` naming the keys of any inconsistent setting."""
        flags = [f for f in PRECISION_FLAGS if getattr(self, f)]
        if len(flags) > 1:
            raise ValueError(f"config keys {' and '.join(flags)} are all true; set at most one precision flag")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be positive, got {getattr(self, key)}")
        if self.hidden_size != self.num_attention_heads * self.kv_channels:
            raise ValueError(
                f"config keys hidden_size={self.hidden_size} and num_attention_heads*kv_channels="
                f"{self.num_attention_heads}*{self.kv_channels} must be equal"
            )
        if self.intermediate_size <= 0 or self.intermediate_size % 2:
            raise ValueError(f"config key intermediate_size={self.intermediate_size} must be a positive even number")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"config key rotary_pct={self.rotary_pct} must be in (0, 1]")
        rot = int(self.kv_channels * self.rotary_pct)
        if rot % 2 or rot < 2:
            raise ValueError(
                f"config keys kv_channels={self.kv_channels} and rotary_pct={self.rotary_pct} give an "
                f"odd or empty rotary width ({rot}); it must be even"
            )
        if self.seq_length <= 0:
            raise ValueError(f"config key seq_length must be positive, got {self.seq_length}")
        if not float(self.rotary_emb_base) > 0:
            raise ValueError(f"config key rotary_emb_base must be positive, got {self.rotary_emb_base}")
        if not self.layer_norm_epsilon >= 0:
            raise ValueError(f"config key layer_norm_epsilon must not be negative, got {self.layer_norm_epsilon}")
        if self.use_flash_attn not in ("auto", True, False):
            raise ValueError(f"config key use_flash_attn={self.use_flash_attn!r} must be 'auto', true or false")
        self.layer_windows()  # validates window_size

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (``None`` = unlimited)."""
        w = self.window_size
        if w is None or isinstance(w, int):
            windows = [w] * self.num_hidden_layers
        elif isinstance(w, (list, tuple)):
            windows = list(w)
            if len(windows) != self.num_hidden_layers:
                raise ValueError(
                    f"config key window_size has {len(windows)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one entry per layer or a single int"
                )
        else:
            raise ValueError(f"config key window_size={w!r} must be null, an int or a list of ints")
        for v in windows:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"config key window_size: {v!r} is not a positive int or null")
        return windows

    @property
    def precision_flag(self) -> str | None:
        """The precision flag that is set (``"bf16"``, ``"fp16"``, ``"fp32"``) or ``None``."""
        return next((flag for flag in PRECISION_FLAGS if getattr(self, flag)), None)
