"""Configuration of the first-generation Qwen models (model_type ``"qwen"``).

Accepts every key of the published ``config.json`` files, including the names used
by the first Qwen-7B release, which are mapped onto the current ones.
"""

from __future__ import annotations

import inspect
import logging

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# First-release key -> current key. Values are copied unless the current key is also
# given with a different value, which is an error.
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

# First-release keys that only described how the function was computed. Listed with
# the only value our network implements; another value is refused.
LEGACY_FIXED = {
    "activation": "swiglu",
    "pos_emb": "rotary",
    "apply_residual_connection_post_layernorm": False,
}

# First-release keys that change nothing at inference and are kept only for round trips.
LEGACY_IGNORED = ("resid_pdrop", "bias_dropout_fusion", "fp32_residual_connection")

PRECISION_FLAGS = ("bf16", "fp16", "fp32")
_PARAMS_DTYPE = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _flag(key: str, value) -> bool:
    """A boolean config value: JSON true/false (or 0/1); anything else is an error rather
    than Python truthiness (``"no"`` would be true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"config key {key}={value!r} must be true or false")


class QWenConfig(PretrainedConfig):
    """Configuration for :class:`qwen.QWenLMHeadModel`.

    ``intermediate_size`` is twice the MLP width, as in the official checkpoints: the
    MLP projects to ``intermediate_size // 2``.

    ``window_size`` (not in the official code) limits every query to that many most
    recent keys: ``None`` (default, full causal attention), one int for all layers, or
    a list with one int (or ``None``) per layer.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"head_dim": "kv_channels", "num_key_value_heads": "num_attention_heads"}

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        kv_channels: int | None = None,
        intermediate_size: int = 22016,
        seq_length: int = 8192,
        max_position_embeddings: int = 8192,
        rotary_emb_base: float = 10000,
        rotary_pct: float = 1.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        scale_attn_weights: bool = True,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: str | bool = "auto",
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        softmax_in_fp32: bool = False,
        use_cache_quantization: bool = False,
        use_cache_kernel: bool = False,
        onnx_safe: bool | None = None,
        window_size: int | list[int | None] | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        given = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            attn_dropout_prob=attn_dropout_prob,
            emb_dropout_prob=emb_dropout_prob,
        )
        for old, new in LEGACY_KEYS.items():
            if old not in kwargs:
                continue
            value = kwargs.pop(old)
            if new == "tokenizer_class":
                kwargs.setdefault("tokenizer_class", value)
                continue
            # padded_vocab_size is the embedding size; vocab_size may legitimately differ.
            if given[new] != _defaults()[new] and given[new] != value and new != "vocab_size":
                raise ValueError(
                    f"config keys {old!r}={value!r} (first-release name) and {new!r}={given[new]!r} "
                    "disagree; remove one of them"
                )
            given[new] = value
        for key, expected in LEGACY_FIXED.items():
            if key in kwargs and kwargs.pop(key) != expected:
                raise ValueError(
                    f"config key {key!r} must be {expected!r} for a Qwen-1 model; this checkpoint "
                    "describes a different architecture"
                )
        for key in LEGACY_IGNORED:
            kwargs.pop(key, None)
        params_dtype = kwargs.pop("params_dtype", None)
        if params_dtype is not None and not (bf16 or fp16 or fp32):
            flag = _PARAMS_DTYPE.get(str(params_dtype))
            if flag is None:
                raise ValueError(f"config key 'params_dtype'={params_dtype!r} is not one of {sorted(_PARAMS_DTYPE)}")
            bf16, fp16, fp32 = (flag == "bf16", flag == "fp16", flag == "fp32")

        self.vocab_size = int(given["vocab_size"])
        self.hidden_size = int(given["hidden_size"])
        self.num_hidden_layers = int(given["num_hidden_layers"])
        self.num_attention_heads = int(given["num_attention_heads"])
        if kv_channels is None:  # (a non-positive head count is reported by validate_qwen)
            kv_channels = self.hidden_size // self.num_attention_heads if self.num_attention_heads > 0 else 0
        self.kv_channels = int(kv_channels)
        self.intermediate_size = int(given["intermediate_size"])
        self.seq_length = int(seq_length)
        self.max_position_embeddings = int(given["max_position_embeddings"])
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = float(rotary_pct)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.initializer_range = initializer_range
        self.emb_dropout_prob = float(given["emb_dropout_prob"])
        self.attn_dropout_prob = float(given["attn_dropout_prob"])
        self.scale_attn_weights = _flag("scale_attn_weights", scale_attn_weights)
        self.no_bias = _flag("no_bias", no_bias)
        self.use_dynamic_ntk = _flag("use_dynamic_ntk", use_dynamic_ntk)
        self.use_logn_attn = _flag("use_logn_attn", use_logn_attn)
        self.use_flash_attn = use_flash_attn
        self.bf16 = _flag("bf16", bf16)
        self.fp16 = _flag("fp16", fp16)
        self.fp32 = _flag("fp32", fp32)
        self.softmax_in_fp32 = _flag("softmax_in_fp32", softmax_in_fp32)
        self.use_cache_quantization = _flag("use_cache_quantization", use_cache_quantization)
        self.use_cache_kernel = _flag("use_cache_kernel", use_cache_kernel)
        self.onnx_safe = onnx_safe
        self.window_size = window_size
        self.use_cache = use_cache
        # transformers 5 no longer declares these on every config; the official README
        # passes pad_token_id to from_pretrained, so they must exist to be overridden.
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
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
            raise ValueError(
                f"config key intermediate_size={self.intermediate_size} must be a positive even "
                "number (the MLP width is intermediate_size // 2)"
            )
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
        for flag in PRECISION_FLAGS:
            if getattr(self, flag):
                return flag
        return None


def _defaults() -> dict:
    params = inspect.signature(QWenConfig.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
