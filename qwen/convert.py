"""Qwen-1 -> Qwen2 layout: tensor names and config.

Within its trained context (``seq_length``) a Qwen-1 model computes the same function
as a ``Qwen2ForCausalLM`` of the same width with ``rope_theta = rotary_emb_base``,
q/k/v biases, no o_proj bias and untied embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def qwen2_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The Qwen2 tensors that one Qwen-1 tensor becomes (``c_attn`` splits in three)."""
    if name in _TOP:
        yield _TOP[name], tensor
        return
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"unexpected tensor {name!r}: not part of the Qwen-1 layout")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
            yield f"{prefix}self_attn.{part}.{kind}", chunk.contiguous()
    elif rest in _RENAMES:
        yield prefix + _RENAMES[rest], tensor
    else:
        raise ValueError(f"tensor {name!r} has no Qwen2 counterpart (biases on c_proj/MLP are not supported by Qwen2)")


def qwen2_config_dict(cfg: dict, max_position: int | None = None) -> dict:
    """A ``Qwen2Config`` dict for a Qwen-1 ``config.json`` dict."""
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(f"rotary_pct={cfg['rotary_pct']} < 1 has no exact Qwen2 equivalent; refusing to convert")
    if not cfg.get("no_bias", True):
        raise ValueError("no_bias=false (biases on c_proj and the MLP) has no exact Qwen2 equivalent")
    heads = cfg["num_attention_heads"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"] // 2,
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": cfg.get("kv_channels", cfg["hidden_size"] // heads),
        "hidden_act": "silu",
        "max_position_embeddings": max_position or cfg["seq_length"],
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
        "rope_theta": float(cfg.get("rotary_emb_base", 10000)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }
