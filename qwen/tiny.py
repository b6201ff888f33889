"""Tiny random checkpoints in the official Qwen-1 on-disk layout, for tests and examples."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configuration_qwen import QWenConfig
from .remote_code import MODEL_AUTO_MAP, TOKENIZER_AUTO_MAP, write_remote_code

EOD_ID = 151643

CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": EOD_ID,
    "pad_token_id": EOD_ID,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
}
BASE_GENERATION_CONFIG = {
    "chat_format": "raw",
    "eos_token_id": EOD_ID,
    "pad_token_id": EOD_ID,
    "stop_words_ids": [[EOD_ID]],
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def official_vocab_file() -> Path:
    """``qwen.tiktoken`` as shipped in the PyPI package ``dashscope``."""
    try:
        import dashscope
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise FileNotFoundError(
            "qwen.tiktoken not found: install the PyPI package 'dashscope' (it ships the "
            "vocabulary) or copy qwen.tiktoken from an official Qwen checkpoint"
        ) from err
    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed dashscope package")
    return path


def make_tiny_checkpoint(
    out_dir: str | Path,
    chat: bool = False,
    seq_length: int = 8192,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 256,
    seed: int = 0,
    dtype: str = "bf16",
    vocab_size: int = 151936,
    init_std: float = 0.1,
    tie_word_embeddings: bool = False,
    force: bool = False,
    **config_overrides,
) -> Path:
    """Write a small random checkpoint in the official layout and return its path.

    ``init_std`` is larger than a real model's so that random logits are decisive
    (greedy choices do not hinge on rounding noise). ``out_dir`` must be missing or empty
    unless ``force``; then the weight files already there are replaced with the new ones.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to overwrite the checkpoint there")
        for pattern in _WEIGHT_FILES:  # left over, they would be loaded instead of (or beside) the new weights
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = QWenConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        kv_channels=hidden // heads,
        intermediate_size=intermediate,
        seq_length=seq_length,
        max_position_embeddings=seq_length,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    gen = torch.Generator().manual_seed(seed)
    state = {}
    width = intermediate // 2
    h = hidden

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * init_std).to(_DTYPES[dtype])

    def norm():
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(_DTYPES[dtype])

    state["transformer.wte.weight"] = rand(vocab_size, h)
    for i in range(layers):
        p = f"transformer.h.{i}."
        state[p + "ln_1.weight"] = norm()
        state[p + "attn.c_attn.weight"] = rand(3 * h, h)
        state[p + "attn.c_attn.bias"] = rand(3 * h)
        state[p + "attn.c_proj.weight"] = rand(h, h)
        state[p + "ln_2.weight"] = norm()
        state[p + "mlp.w1.weight"] = rand(width, h)
        state[p + "mlp.w2.weight"] = rand(width, h)
        state[p + "mlp.c_proj.weight"] = rand(h, width)
        if not config.no_bias:
            state[p + "attn.c_proj.bias"] = rand(h)
            state[p + "mlp.w1.bias"] = rand(width)
            state[p + "mlp.w2.bias"] = rand(width)
            state[p + "mlp.c_proj.bias"] = rand(h)
    state["transformer.ln_f.weight"] = norm()
    if not tie_word_embeddings:
        state["lm_head.weight"] = rand(vocab_size, h)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors creates its file with mode 0600; give it a new file's usual mode, like the others.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)

    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": MODEL_AUTO_MAP,
        "model_type": "qwen",
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
    }
    for key in (
        "attn_dropout_prob bf16 emb_dropout_prob fp16 fp32 hidden_size intermediate_size "
        "initializer_range kv_channels layer_norm_epsilon max_position_embeddings no_bias "
        "num_attention_heads num_hidden_layers onnx_safe rotary_emb_base rotary_pct "
        "scale_attn_weights seq_length softmax_in_fp32 tie_word_embeddings use_cache "
        "use_cache_kernel use_cache_quantization use_dynamic_ntk use_flash_attn "
        "use_logn_attn vocab_size"
    ).split():
        cfg[key] = getattr(config, key)
    if config.window_size is not None:
        cfg["window_size"] = config.window_size
    _write_json(out / "config.json", dict(sorted(cfg.items())))
    _write_json(
        out / "generation_config.json",
        {**(CHAT_GENERATION_CONFIG if chat else BASE_GENERATION_CONFIG), "transformers_version": "4.32.0"},
    )
    _write_json(
        out / "tokenizer_config.json",
        {"model_max_length": seq_length, "tokenizer_class": "QWenTokenizer", "auto_map": TOKENIZER_AUTO_MAP},
    )
    shutil.copyfile(official_vocab_file(), out / "qwen.tiktoken")
    write_remote_code(out, backup=False)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
