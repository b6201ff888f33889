"""Independent references for the Qwen-1 function.

* ``qwen2_reference``: ``transformers``' own ``Qwen2ForCausalLM`` on the same weights,
  renamed (q/k/v split out of ``c_attn``, ``w2`` -> gate, ``w1`` -> up). Within
  ``seq_length`` it computes the Qwen-1 function.
* ``naive_forward``: a direct transcription of the official formulas (dynamic NTK,
  logN, window) in a few lines of plain torch, for inputs beyond ``seq_length``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM


def load_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(Path(ckpt) / "model.safetensors")).items()}


def qwen2_state_dict(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"]}
    for i in range(layers):
        s, d = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[s + "attn.c_attn.weight"].chunk(3, dim=0)
        qb, kb, vb = state[s + "attn.c_attn.bias"].chunk(3, dim=0)
        out |= {
            d + "self_attn.q_proj.weight": q,
            d + "self_attn.k_proj.weight": k,
            d + "self_attn.v_proj.weight": v,
            d + "self_attn.q_proj.bias": qb,
            d + "self_attn.k_proj.bias": kb,
            d + "self_attn.v_proj.bias": vb,
            d + "self_attn.o_proj.weight": state[s + "attn.c_proj.weight"],
            d + "mlp.gate_proj.weight": state[s + "mlp.w2.weight"],
            d + "mlp.up_proj.weight": state[s + "mlp.w1.weight"],
            d + "mlp.down_proj.weight": state[s + "mlp.c_proj.weight"],
            d + "input_layernorm.weight": state[s + "ln_1.weight"],
            d + "post_attention_layernorm.weight": state[s + "ln_2.weight"],
        }
    out["model.norm.weight"] = state["transformer.ln_f.weight"]
    out["lm_head.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
    return out


def qwen2_reference(ckpt: Path, rope_theta: float | None = None) -> Qwen2ForCausalLM:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["seq_length"],
        rms_norm_eps=cfg["layer_norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta or cfg["rotary_emb_base"]},
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    model.load_state_dict(qwen2_state_dict(load_state(ckpt), cfg["num_hidden_layers"]), strict=True)
    return model


def naive_forward(
    ckpt: Path,
    ids: list[int],
    use_dynamic_ntk: bool,
    use_logn_attn: bool,
    window: int | None | list[int | None] = None,
    ntk_length: int | None = None,
) -> torch.Tensor:
    """fp32 logits of one unpadded sequence, straight from the official formulas.
    ``window``: one attention window for every layer, or a list with one per layer.
    ``ntk_length``: the length the dynamic-NTK alpha is computed from (default: the whole
    sequence). Decoding with a cache keeps the alpha of the prompt it started from, so a
    prompt of ``ntk_length`` tokens decoded to ``len(ids)`` has these logits."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    w = load_state(ckpt)
    n_heads, d, S = cfg["num_attention_heads"], cfg["kv_channels"], cfg["seq_length"]
    L = len(ids)
    base = float(cfg["rotary_emb_base"])
    if use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log((ntk_length or L) / S, 2) + 1) - 1, 1)
        base = base * alpha ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(L).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def rope(t):  # (L, heads, d)
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["layer_norm_epsilon"]) * weight

    logn = torch.tensor([math.log(p + 1, S) if p + 1 > S else 1.0 for p in range(L)])
    layers = cfg["num_hidden_layers"]
    windows = window if isinstance(window, list) else [window] * layers
    x = w["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(layers):
        p = f"transformer.h.{i}."
        allowed = torch.ones(L, L).tril().bool()  # key k visible from query q: q - window < k <= q
        if windows[i] is not None:
            allowed &= ~torch.ones(L, L).tril(-windows[i]).bool()
        h = rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(L, n_heads, d) for t in qkv.split(n_heads * d, dim=-1))
        q, k = rope(q), rope(k)
        if use_logn_attn:
            q = q * logn[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        a = torch.einsum("hqk,khd->qhd", scores, v).reshape(L, n_heads * d)
        x = x + a @ w[p + "attn.c_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        m = (h @ w[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(h @ w[p + "mlp.w2.weight"].T)
        x = x + m @ w[p + "mlp.c_proj.weight"].T
    x = rms(x, w["transformer.ln_f.weight"])
    return x @ w.get("lm_head.weight", w["transformer.wte.weight"]).T
