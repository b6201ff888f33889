"""Export a Qwen-1 checkpoint to the standard Qwen2 layout (``Qwen2ForCausalLM``).

Within its trained context (``seq_length``) a Qwen-1 model computes the same function
as a ``Qwen2ForCausalLM`` of the same width with ``rope_theta = rotary_emb_base``,
q/k/v biases, no o_proj bias and untied embeddings. The export renames the tensors,
splits ``c_attn`` into ``q_proj``/``k_proj``/``v_proj`` and writes a ``config.json``,
a fast tokenizer with a ChatML chat template and a ``generation_config.json`` that
transformers, vLLM, SGLang and llama.cpp's GGUF converter read natively.

GPTQ checkpoints (the official -Int4/-Int8) export to Qwen2-layout GPTQ checkpoints: the
``qweight``/``qzeros``/``scales``/``g_idx`` of each block linear are renamed, ``c_attn``'s
split along the output dimension (columns of ``qweight`` and ``scales``, packed int32
columns of ``qzeros``, rows of ``bias``; ``g_idx`` copied), and the ``quantization_config``
is carried over (:func:`qwen2_gptq_parts`).

The weights are streamed: each output tensor is copied from the source files in
blocks of rows (``BLOCK_BYTES`` at a time), so the converter's memory does not grow
with the model. Safetensors sources are read with plain file reads (not mapped into
the process); ``pytorch_model*.bin`` sources are opened one shard at a time with
``torch.load(mmap=True, weights_only=True)``.

Public entry points: :func:`convert_qwen2` (what ``python -m qwen convert-qwen2`` runs),
and the building blocks :func:`qwen2_tensors`, :func:`qwen2_config_dict`,
:func:`qwen2_generation_config_dict`, :func:`write_qwen2_weights` and
:func:`export_tokenizer`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

EOD_ID = 151643  # <|endoftext|>
IM_END_ID = 151645  # <|im_end|>
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
BLOCK_BYTES = 16 * 2**20  # rows are copied in blocks of about this many source bytes

# The prompt of qwen_generation_utils.make_context as a Jinja chat template: ChatML,
# one message per "<|im_start|>role\ncontent<|im_end|>" block, blocks joined by "\n",
# and the default system prompt of QWenLMHeadModel.chat() when no system message is given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Files that make a directory "hold a checkpoint" (refused as a destination without force).
_CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# Non-persistent buffers that some saved Qwen-1 state dicts still carry.
_SKIPPED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|masked_bias)$")


class ConversionError(ValueError):
    """The source cannot be converted exactly, or the destination is not usable."""


# --------------------------------------------------------------------------- names


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


def qwen2_parts(name: str, shape: tuple[int, ...] | torch.Size) -> list[tuple[str, int, int]]:
    """``(qwen2_name, first_row, end_row)`` for each Qwen2 tensor that the Qwen-1 tensor
    ``name`` of this ``shape`` becomes: rows of dim 0 (``c_attn`` splits in three)."""
    rows = int(shape[0]) if len(shape) else 1
    if name in _TOP:
        return [(_TOP[name], 0, rows)]
    match = _LAYER.match(name)
    if match is None:
        raise ConversionError(f"unexpected tensor {name!r}: not part of the Qwen-1 layout")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        if rows % 3:
            raise ConversionError(f"{name} has {rows} rows, not a multiple of 3 (q, k, v)")
        kind, third = rest.rsplit(".", 1)[1], rows // 3
        return [
            (f"{prefix}self_attn.{part}.{kind}", index * third, (index + 1) * third)
            for index, part in enumerate(("q_proj", "k_proj", "v_proj"))
        ]
    if rest in _RENAMES:
        return [(prefix + _RENAMES[rest], 0, rows)]
    raise ConversionError(
        f"tensor {name!r} has no Qwen2 counterpart (biases on c_proj/MLP, adapters or quantized "
        "weights cannot be expressed in Qwen2ForCausalLM)"
    )


def qwen2_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The Qwen2 tensors that one Qwen-1 tensor becomes (``c_attn`` splits in three)."""
    for new_name, start, end in qwen2_parts(name, tensor.shape):
        if start == 0 and end == (tensor.shape[0] if tensor.ndim else 1):
            yield new_name, tensor
        else:
            yield new_name, tensor[start:end].contiguous()


# --------------------------------------------------------------------------- GPTQ names

# The quantized linears of a Qwen-1 block -> their Qwen2 names (c_attn splits into q/k/v).
# Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
_GPTQ_LINEARS = {
    "attn.c_attn": None,
    "attn.c_proj": "self_attn.o_proj",
    "mlp.w2": "mlp.gate_proj",
    "mlp.w1": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQSettings:
    """What the export needs from a GPTQ ``quantization_config``."""

    bits: int
    group_size: int  # -1: one group over all inputs

    @property
    def per_word(self) -> int:
        """Integers packed in one int32."""
        return 32 // self.bits

    def groups(self, n_in: int) -> int:
        return 1 if self.group_size == -1 else -(-n_in // self.group_size)


def gptq_settings(cfg: dict) -> GPTQSettings | None:
    """The GPTQ settings of a Qwen-1 ``config.json`` dict; None for an unquantized one.

    Raises :class:`ConversionError` for other quantization methods, for packings the
    export cannot split (``bits`` must divide 32; the ``gptq_v2`` format is refused, it
    stores zero points without auto-gptq's offset and engines read ``gptq``) and for a
    ``quantization_config`` that lacks ``bits`` or ``group_size``.
    """
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ConversionError(f"quantization_config in config.json is a {type(qc).__name__}, not an object")
    method = str(qc.get("quant_method", "unknown")).lower()
    if method != "gptq":
        raise ConversionError(
            f"this is a quantized ({method}) checkpoint; only GPTQ checkpoints (quant_method 'gptq', the official "
            "-Int4/-Int8) can be exported. Convert the unquantized model and quantize the Qwen2 export with your "
            "engine's tools."
        )
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits not in (2, 4, 8):
        raise ConversionError(
            f"this quantized (gptq) checkpoint has bits={bits!r} in its quantization_config; the GPTQ export "
            "splits packed int32 words and needs bits 2, 4 or 8 (the official checkpoints: 4 or 8)"
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise ConversionError(
            f"this quantized (gptq) checkpoint has group_size={group_size!r} in its quantization_config; GPTQ "
            "checkpoints state a positive group_size (or -1): restore config.json from the checkpoint's source"
        )
    checkpoint_format = qc.get("checkpoint_format", "gptq")
    if checkpoint_format not in (None, "gptq"):
        raise ConversionError(
            f"this quantized (gptq) checkpoint is in checkpoint_format={checkpoint_format!r}; the export writes "
            "auto-gptq's 'gptq' format that transformers and vLLM read, and takes only that format as input"
        )
    return GPTQSettings(bits=int(bits), group_size=int(group_size))


def qwen2_gptq_parts(
    name: str, shape: tuple[int, ...] | torch.Size, gptq: GPTQSettings
) -> list[tuple[str, tuple[int, int], tuple[int, int] | None]]:
    """``(qwen2_name, (first_row, end_row), (first_col, end_col) or None)`` for each Qwen2
    tensor that the tensor ``name`` of this ``shape`` in a GPTQ checkpoint becomes.

    The quantized linears keep their GPTQ tensors under the Qwen2 module names. ``c_attn``
    splits into q/k/v along its output dimension, which is dim 1 of ``qweight``, ``scales``
    and (packed ``32 / bits`` outputs per int32) ``qzeros``, and dim 0 of ``bias``; each of
    q/k/v gets the whole ``g_idx`` (the inputs are not split). The 16-bit tensors
    (embeddings, norms, ``lm_head``) are renamed as in the float export.
    """
    shape = tuple(int(n) for n in shape)
    match = _LAYER.match(name)
    module, _, part = match.group(2).rpartition(".") if match else ("", "", "")
    if module not in _GPTQ_LINEARS:
        return [(new, (start, end), None) for new, start, end in qwen2_parts(name, shape)]
    layer = match.group(1)
    if part not in (*_GPTQ_TENSORS, "bias"):
        raise ConversionError(
            f"tensor {name!r} in a GPTQ checkpoint: expected the quantized linear's qweight, qzeros, scales, g_idx "
            "(and bias); checkpoints with some block linears left unquantized cannot be exported"
        )
    prefix = f"model.layers.{layer}."
    rows = shape[0] if shape else 1
    whole = (0, rows)
    if module != "attn.c_attn":
        return [(f"{prefix}{_GPTQ_LINEARS[module]}.{part}", whole, None)]
    names = [f"{prefix}self_attn.{proj}.{part}" for proj in ("q_proj", "k_proj", "v_proj")]
    if part == "g_idx":
        return [(new, whole, None) for new in names]
    width = rows if part == "bias" else shape[1] if len(shape) == 2 else 0
    if (part == "bias") != (len(shape) == 1) or width % 3:
        if part == "qzeros":
            raise ConversionError(
                f"{name} has {width} packed int32 columns, not a multiple of 3: the zero points of q, k and v "
                f"({gptq.per_word} per int32 at bits={gptq.bits}) do not start on int32 boundaries, so they "
                "cannot be split"
            )
        raise ConversionError(f"{name} has shape {list(shape)}: its output dimension does not split into q, k and v")
    third = width // 3
    if part == "bias":
        return [(new, (i * third, (i + 1) * third), None) for i, new in enumerate(names)]
    return [(new, whole, (i * third, (i + 1) * third)) for i, new in enumerate(names)]


# --------------------------------------------------------------------------- config


def check_convertible(cfg: dict) -> None:
    """Raise :class:`ConversionError` unless the Qwen-1 config has an exact Qwen2 equivalent."""
    if cfg.get("model_type") not in (None, "qwen"):
        raise ConversionError(f"config.json has model_type={cfg.get('model_type')!r}; expected a Qwen-1 'qwen' model")
    if cfg.get("quantization_config"):
        gptq_settings(cfg)  # raises for what cannot be exported
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise ConversionError(
            f"rotary_pct={cfg['rotary_pct']} < 1 (RoPE on part of each head) has no exact Qwen2 equivalent"
        )
    if not cfg.get("no_bias", True):
        raise ConversionError(
            "no_bias=false (biases on attn.c_proj and the MLP) has no exact Qwen2 equivalent: "
            "Qwen2 has no o_proj or MLP biases"
        )
    if not cfg.get("scale_attn_weights", True):
        raise ConversionError("scale_attn_weights=false (unscaled attention) has no exact Qwen2 equivalent")
    if cfg.get("window_size") is not None:
        raise ConversionError("window_size (windowed attention) has no exact Qwen2 equivalent")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    kv_channels = int(cfg.get("kv_channels") or hidden // heads)
    if kv_channels * heads != hidden:
        raise ConversionError(
            f"kv_channels*num_attention_heads = {kv_channels}*{heads} differs from hidden_size={hidden}; "
            "Qwen2 engines assume head_dim = hidden_size / num_attention_heads"
        )


def _rope(theta: float, seq_length: int, max_position: int, rope_scaling: str | None) -> tuple[int, dict, dict | None]:
    """``(max_position_embeddings, rope_parameters, legacy rope_scaling)``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling in (None, "none"):
        return max_position, params, None
    factor = max_position / seq_length
    if factor <= 1:
        raise ConversionError(f"--rope-scaling {rope_scaling} needs --max-position above seq_length={seq_length}")
    if rope_scaling == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": seq_length}
        position = max_position
    elif rope_scaling == "dynamic":
        # Dynamic NTK grows from max_position_embeddings: keep it at the trained length, so
        # that transformers leaves prompts within seq_length untouched.
        scaling = {"rope_type": "dynamic", "factor": factor}
        position = seq_length
    else:
        raise ConversionError(f"unknown rope scaling {rope_scaling!r}; expected none, yarn or dynamic")
    params.update(scaling)
    # The pre-transformers-5 spelling (rope_scaling with "type"), read by older engines.
    legacy = {**scaling, "type": scaling["rope_type"]}
    return position, params, legacy


def qwen2_config_dict(
    cfg: dict,
    max_position: int | None = None,
    *,
    rope_scaling: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    chat: bool = False,
) -> dict:
    """A ``Qwen2Config`` dict (``config.json``) for a Qwen-1 ``config.json`` dict.

    ``max_position`` defaults to ``seq_length``. Beyond ``seq_length``, ``rope_scaling``
    ("yarn" or "dynamic") adds a rope-scaling entry with ``factor = max_position /
    seq_length``; Qwen-1's own dynamic NTK and logN scaling have no Qwen2 equivalent, so
    the model then computes a different function beyond ``seq_length`` (and, with yarn,
    slightly different within it too).

    The RoPE base is written both as transformers 5 reads it (``rope_parameters``) and as
    older readers do (top-level ``rope_theta``, and ``rope_scaling`` when scaled).
    """
    check_convertible(cfg)
    seq_length = int(cfg.get("seq_length") or cfg.get("max_position_embeddings") or 8192)
    theta = float(cfg.get("rotary_emb_base", 10000))
    position, rope_parameters, legacy_scaling = _rope(theta, seq_length, int(max_position or seq_length), rope_scaling)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    layers = int(cfg["num_hidden_layers"])
    out = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]) // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg["num_attention_heads"]),
        "hidden_act": "silu",
        "max_position_embeddings": position,
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        "use_cache": True,
        "bos_token_id": EOD_ID,
        "eos_token_id": IM_END_ID if chat else EOD_ID,
        "torch_dtype": _CONFIG_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
    }
    if legacy_scaling is not None:
        out["rope_scaling"] = legacy_scaling
    if gptq_settings(cfg) is not None:
        # The same format under the Qwen2 module names: transformers' GPTQ integration and vLLM
        # quantize every linear of the blocks (model.layers) and read the settings unchanged.
        out["quantization_config"] = dict(cfg["quantization_config"])
    return out


_GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def qwen2_generation_config_dict(gen: dict | None) -> tuple[dict, bool]:
    """``(generation_config.json dict, chat)`` for a Qwen-1 generation config dict.

    A chat model (``chat_format: "chatml"``) stops on ``<|im_end|>`` and ``<|endoftext|>``;
    a base model on ``<|endoftext|>``. The sampling defaults are kept.
    """
    gen = gen or {}
    chat = gen.get("chat_format") == "chatml"
    out: dict[str, Any] = {
        "bos_token_id": EOD_ID,
        "eos_token_id": [IM_END_ID, EOD_ID] if chat else EOD_ID,
        "pad_token_id": EOD_ID,
    }
    out.update({key: gen[key] for key in _GENERATION_KEYS if gen.get(key) is not None})
    return out, chat


# --------------------------------------------------------------------------- sources


class _SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: _SourceFile

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class _SourceFile:
    path: Path

    def tensors(self) -> list[_SourceTensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsTensor(_SourceTensor):
    def __init__(self, file: _SafetensorsFile, name: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int):
        self.file, self.name, self.dtype, self.shape, self.offset = file, name, dtype, shape, offset

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        shape = (end - start, *self.shape[1:]) if self.shape else ()
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=self.dtype)
        row_bytes = self.row_bytes if self.shape else self.dtype.itemsize
        buffer = bytearray(count * self.dtype.itemsize)
        self.file.read_into(self.offset + start * row_bytes, buffer)
        return torch.frombuffer(buffer, dtype=self.dtype).view(shape)


class _SafetensorsFile(_SourceFile):
    """A ``.safetensors`` file read with ordinary reads (never mapped into the process)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if raw == b"version ":
                raise ConversionError(
                    f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in {path.parent}"
                )
            if len(raw) != 8:
                raise ConversionError(f"{path} is not a safetensors file (too short); download it again")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 2**20):
                raise ConversionError(f"{path} is not a safetensors file (bad header length); download it again")
            try:
                header = json.loads(handle.read(header_len))
            except ValueError:
                raise ConversionError(
                    f"{path} is not a safetensors file (unreadable header); download it again"
                ) from None
        self._data_start = 8 + header_len
        self._tensors: list[_SourceTensor] = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
            begin, end = info["data_offsets"]
            tensor = _SafetensorsTensor(self, name, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), begin)
            if end - begin != math.prod(tensor.shape) * tensor.dtype.itemsize or self._data_start + end > size:
                raise ConversionError(
                    f"{path}: tensor {name} has inconsistent data offsets (a cut-short file?); download it again"
                )
            self._tensors.append(tensor)
        self._tensors.sort(key=lambda t: t.offset)

    def tensors(self) -> list[_SourceTensor]:
        return list(self._tensors)

    def read_into(self, offset: int, buffer: bytearray) -> None:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._handle.seek(self._data_start + offset)
        view = memoryview(buffer)
        while view:
            got = self._handle.readinto(view)
            if not got:
                raise ConversionError(f"{self.path}: unexpected end of file")
            view = view[got:]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class _TorchTensor(_SourceTensor):
    def __init__(self, file: _TorchFile, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        tensor = self.file.state()[self.name]
        return tensor[start:end] if tensor.ndim else tensor


class _TorchFile(_SourceFile):
    """A ``pytorch_model*.bin`` shard, memory-mapped while it is being copied."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict[str, torch.Tensor] | None = None
        state = self.state()
        self._tensors: list[_SourceTensor] = [
            _TorchTensor(self, name, value.dtype, tuple(value.shape))
            for name, value in state.items()
            if isinstance(value, torch.Tensor)
        ]
        self.close()

    def state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            try:
                state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as err:
                raise ConversionError(
                    f"cannot memory-map {self.path} ({err}); re-save it with torch.save (zip format) or as safetensors"
                ) from err
            if not isinstance(state, dict):
                raise ConversionError(f"{self.path} does not hold a state dict")
            self._state = state
        return self._state

    def tensors(self) -> list[_SourceTensor]:
        return list(self._tensors)

    def close(self) -> None:
        self._state = None


def _source_files(src: Path) -> list[_SourceFile]:
    """The weight files of an official-layout checkpoint, in index order."""
    for index_name, single, kind in (
        ("model.safetensors.index.json", "model.safetensors", _SafetensorsFile),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _TorchFile),
    ):
        index = src / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map; restore it from the checkpoint's source")
            names = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in names if not (src / name).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are missing: {missing[:3]}")
            return [kind(src / name) for name in sorted(names)]
        if (src / single).is_file():
            return [kind(src / single)]
    raise ConversionError(
        f"{src} has no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Output:
    """One Qwen2 tensor: rows ``start:end`` (and columns ``cols``, a ``(first, end)`` pair,
    where given) of a source tensor, stored as ``dtype``."""

    name: str
    source: _SourceTensor
    start: int
    end: int
    dtype: torch.dtype
    cols: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.cols is not None:
            return (self.end - self.start, self.cols[1] - self.cols[0])
        return (self.end - self.start, *self.source.shape[1:]) if self.source.shape else ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    hidden, vocab, layers = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])
    width = int(cfg["intermediate_size"]) // 2
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for part in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{p}self_attn.{part}.weight"] = (hidden, hidden)
            shapes[f"{p}self_attn.{part}.bias"] = (hidden,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (width, hidden)
        shapes[p + "mlp.up_proj.weight"] = (width, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, width)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def _expected_gptq_shapes(cfg: dict, gptq: GPTQSettings) -> dict[str, tuple[int, ...]]:
    """The Qwen2 tensors of a GPTQ export: the float export's, each block linear's weight
    replaced by its GPTQ tensors (the format of ``qwen.quantization``)."""
    hidden, width, bits = int(cfg["hidden_size"]), int(cfg["intermediate_size"]) // 2, gptq.bits
    shapes = {}
    for name, shape in _expected_shapes(cfg).items():
        if not name.endswith("_proj.weight"):
            shapes[name] = shape
            continue
        module = name.removesuffix(".weight")
        n_out, n_in = shape
        for size, what in ((n_in, "input"), (n_out, "output")):
            if size % gptq.per_word:
                raise ConversionError(
                    f"{module} has {size} {what}s, not a multiple of 32/bits={gptq.per_word}: it cannot be stored "
                    f"packed at bits={bits} (is the config.json of another model? hidden_size={hidden}, "
                    f"intermediate_size/2={width})"
                )
        groups = gptq.groups(n_in)
        shapes[module + ".qweight"] = (n_in * bits // 32, n_out)
        shapes[module + ".qzeros"] = (groups, n_out * bits // 32)
        shapes[module + ".scales"] = (groups, n_out)
        shapes[module + ".g_idx"] = (n_in,)
    return shapes


def _source_tensors(files: list[_SourceFile], cfg: dict):
    """``(file, tensor)`` for every tensor the export takes: skipped ones left out (and a tied
    ``lm_head``), a tensor stored in two files refused."""
    tied = bool(cfg.get("tie_word_embeddings", False))
    seen: dict[str, Path] = {}
    for file in files:
        for tensor in file.tensors():
            if _SKIPPED.search(tensor.name) or (tied and tensor.name == "lm_head.weight"):
                logger.debug("skipping %s", tensor.name)
                continue
            if tensor.name in seen:
                raise ConversionError(f"tensor {tensor.name} appears in both {seen[tensor.name]} and {file.path}")
            seen[tensor.name] = file.path
            yield file, tensor


def _plan(files: list[_SourceFile], cfg: dict, dtype: torch.dtype | None) -> list[_Output]:
    gptq = gptq_settings(cfg)
    if gptq is not None:
        return _plan_gptq(files, cfg, dtype, gptq)
    outputs: list[_Output] = []
    for file, tensor in _source_tensors(files, cfg):
        if not tensor.dtype.is_floating_point:
            raise ConversionError(
                f"tensor {tensor.name} in {file.path} is {tensor.dtype}, not floating point "
                "(a quantized checkpoint?); only unquantized checkpoints can be converted"
            )
        for name, start, end in qwen2_parts(tensor.name, tensor.shape):
            outputs.append(_Output(name, tensor, start, end, dtype or tensor.dtype))
    expected = _expected_shapes(cfg)
    got = {output.name: output.shape for output in outputs}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ConversionError(f"the checkpoint is incomplete: {len(missing)} tensors missing, e.g. {missing[:3]}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ConversionError(f"tensors beyond num_hidden_layers={cfg['num_hidden_layers']}: {extra[:3]}")
    wrong = [f"{name} {got[name]} (config says {shape})" for name, shape in expected.items() if got[name] != shape]
    if wrong:
        raise ConversionError(f"tensor shapes disagree with config.json: {wrong[:3]}")
    return outputs


def _plan_gptq(files: list[_SourceFile], cfg: dict, dtype: torch.dtype | None, gptq: GPTQSettings) -> list[_Output]:
    """The plan of a GPTQ checkpoint: the GPTQ tensors (and the quantized linears' biases)
    keep their stored dtypes; ``dtype`` applies to the 16-bit embeddings, norms and head."""
    outputs: list[_Output] = []
    for file, tensor in _source_tensors(files, cfg):
        for name, (start, end), cols in qwen2_gptq_parts(tensor.name, tensor.shape, gptq):
            quantized = name.rsplit(".", 2)[-2].endswith("_proj")
            if not quantized and not tensor.dtype.is_floating_point:
                raise ConversionError(f"tensor {tensor.name} in {file.path} is {tensor.dtype}, not floating point")
            out_dtype = tensor.dtype if quantized else dtype or tensor.dtype
            outputs.append(_Output(name, tensor, start, end, out_dtype, cols))
    expected = _expected_gptq_shapes(cfg, gptq)
    got = {output.name: output for output in outputs}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ConversionError(
            f"the GPTQ checkpoint is incomplete: {len(missing)} tensors missing, e.g. {missing[:3]} "
            "(a GPTQ checkpoint stores qweight, qzeros, scales and g_idx for every linear of the blocks)"
        )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ConversionError(f"tensors beyond num_hidden_layers={cfg['num_hidden_layers']}: {extra[:3]}")
    wrong = [
        f"{name} {list(got[name].shape)} (config says {list(shape)})"
        for name, shape in expected.items()
        if got[name].shape != shape
    ]
    if wrong:
        raise ConversionError(
            f"tensor shapes disagree with config.json (bits={gptq.bits}, group_size={gptq.group_size}): {wrong[:3]}"
        )
    for output in outputs:
        kind = output.name.rsplit(".", 1)[1]
        if kind in ("qweight", "qzeros", "g_idx") and output.dtype != torch.int32:
            raise ConversionError(f"{output.source.name} is {output.dtype}; GPTQ stores {kind} as int32")
        if kind == "scales" and not output.dtype.is_floating_point:
            raise ConversionError(f"{output.source.name} is {output.dtype}; GPTQ stores scales as 16-bit floats")
    return outputs


def _shards(outputs: list[_Output], max_shard_size: int) -> list[list[_Output]]:
    shards: list[list[_Output]] = [[]]
    size = 0
    for output in outputs:
        if shards[-1] and size + output.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(output)
        size += output.nbytes
    return shards


# --------------------------------------------------------------------------- write


def _write_shard(path: Path, outputs: list[_Output], progress: Any, closing: dict[_SourceFile, int]) -> None:
    """Write one safetensors file tensor by tensor, in blocks of rows."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for output in outputs:
        header[output.name] = {
            "dtype": _ST_NAMES[output.dtype],
            "shape": list(output.shape),
            "data_offsets": [offset, offset + output.nbytes],
        }
        offset += output.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for output in outputs:
            source = output.source
            step = max(1, BLOCK_BYTES // max(1, source.row_bytes)) if source.shape else 1
            for start in range(output.start, output.end, step):
                block = source.read_rows(start, min(start + step, output.end))
                if output.cols is not None:
                    block = block[:, output.cols[0] : output.cols[1]]
                block = block.to(output.dtype).contiguous()
                handle.write(block.reshape(-1).view(torch.uint8).numpy().data)
                del block
            closing[source.file] -= 1
            if closing[source.file] == 0:
                source.file.close()  # a .bin shard is unmapped as soon as it is done
            progress.update(1)
    os.replace(partial, path)


def write_qwen2_weights(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> torch.dtype:
    """Stream the weights of the Qwen-1 checkpoint ``src`` into ``dst`` in the Qwen2 layout.

    Writes ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size`` bytes.
    ``dtype`` None (or "auto") keeps each tensor's stored dtype. Returns the dtype of the
    embedding as written (what ``config.json`` declares).
    """
    src, dst = Path(src), Path(dst)
    cfg = _read_config(src / "config.json")
    check_convertible(cfg)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else _parse_dtype(dtype)
    max_shard_size = parse_size(max_shard_size)
    files = _source_files(src)
    outputs = _plan(files, cfg, dtype)
    shards = _shards(outputs, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    closing: dict[_SourceFile, int] = {}
    for output in outputs:
        closing[output.source.file] = closing.get(output.source.file, 0) + 1
    dst.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(len(outputs), progress)
    try:
        for name, shard in zip(names, shards, strict=True):
            _write_shard(dst / name, shard, bar, closing)
    finally:
        bar.close()
        for file in files:
            file.close()
    if len(shards) > 1:
        weight_map = {output.name: name for name, shard in zip(names, shards, strict=True) for output in shard}
        index = {"metadata": {"total_size": sum(o.nbytes for o in outputs)}, "weight_map": weight_map}
        _write_json(dst / "model.safetensors.index.json", index)
    embedding = next(o for o in outputs if o.name == "model.embed_tokens.weight")
    logger.info(
        "wrote %d tensors (%.2f GB) in %d file(s)", len(outputs), sum(o.nbytes for o in outputs) / 1e9, len(shards)
    )
    return embedding.dtype


# --------------------------------------------------------------------------- tokenizer


def export_tokenizer(src: str | os.PathLike, dst: str | os.PathLike, chat: bool, model_max_length: int | None = None):
    """Save the checkpoint's tokenizer into ``dst`` as a fast ``Qwen2Tokenizer``
    (``tokenizer.json`` + ``tokenizer_config.json``) with the ChatML chat template.

    ``apply_chat_template(messages, add_generation_prompt=True)`` then gives the ids of
    ``make_context(tokenizer, query, history, system)``, with ``system`` defaulting to
    "You are a helpful assistant.". A chat model's ``eos_token`` is ``<|im_end|>``.
    Returns the fast tokenizer.
    """
    from .tokenization_qwen import QWenTokenizer

    src = Path(src)
    if (src / "qwen.tiktoken").is_file():
        slow = QWenTokenizer.from_pretrained(str(src))
    else:
        logger.warning("%s has no qwen.tiktoken: exporting the standard Qwen vocabulary", src)
        slow = QWenTokenizer()
    settings: dict[str, Any] = {"chat_template": CHAT_TEMPLATE}
    if chat:
        settings["eos_token"] = "<|im_end|>"
    if model_max_length is not None:
        settings["model_max_length"] = model_max_length
    fast = slow.to_fast(**settings)
    fast.save_pretrained(str(dst))
    # transformers 5 writes the template to chat_template.jinja; readers from before that
    # file existed (transformers < 4.52 and the engines pinned to it) look in tokenizer_config.json.
    config_path = Path(dst) / "tokenizer_config.json"
    tokenizer_config = _read_json(config_path)
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    _write_json(config_path, tokenizer_config)
    return fast


# --------------------------------------------------------------------------- all


def convert_qwen2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    max_position: int | None = None,
    rope_scaling: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Convert the official-layout Qwen-1 checkpoint ``src`` into a ``Qwen2ForCausalLM``
    checkpoint in ``dst`` (weights, ``config.json``, ``generation_config.json``, the fast
    tokenizer, and the source's LICENSE/NOTICE files). Returns ``dst``.

    Raises :class:`ConversionError` (before writing anything) for a source that has no
    exact Qwen2 equivalent, and for a ``dst`` that already holds a checkpoint unless
    ``force`` (which first removes its weight files).
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json; is it a checkpoint directory?")
    cfg = _read_config(src / "config.json")
    check_convertible(cfg)
    gen_path = src / "generation_config.json"
    if not gen_path.is_file():
        logger.warning("%s has no generation_config.json: treating it as a base model", src)
    generation, chat = qwen2_generation_config_dict(_read_json(gen_path) if gen_path.is_file() else None)
    seq_length = int(cfg.get("seq_length") or 8192)
    if cfg.get("use_dynamic_ntk") or cfg.get("use_logn_attn"):
        logger.info(
            "use_dynamic_ntk/use_logn_attn act only beyond seq_length=%d, where Qwen2 engines have no equivalent; "
            "the export is exact within it",
            seq_length,
        )
    if max_position is not None and max_position > seq_length and rope_scaling in (None, "none"):
        logger.warning(
            "max_position=%d is beyond the trained context (seq_length=%d) and no rope scaling was chosen: "
            "positions beyond %d are unscaled RoPE extrapolation, where quality drops",
            max_position,
            seq_length,
            seq_length,
        )
    if max_position is not None and max_position < 1:
        raise ConversionError(f"--max-position must be at least 1, got {max_position}")
    qwen2_config_dict(cfg, max_position, rope_scaling=rope_scaling, chat=chat)  # its errors, before writing
    _prepare_destination(src, dst, force)
    written_dtype = write_qwen2_weights(src, dst, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    config = qwen2_config_dict(cfg, max_position, rope_scaling=rope_scaling, dtype=written_dtype, chat=chat)
    # Readers branch on the writer's version (transformers 4.57 warns about a "Mistral
    # regex" when it is missing), so record it as save_pretrained would.
    _write_json(dst / "config.json", {**config, "transformers_version": transformers.__version__})
    _write_json(dst / "generation_config.json", {**generation, "transformers_version": transformers.__version__})
    if tokenizer:
        length = max(config["max_position_embeddings"], int(max_position or 0))
        export_tokenizer(src, dst, chat=chat, model_max_length=length)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name.upper().startswith(("LICENSE", "NOTICE")):
            shutil.copyfile(path, dst / path.name)
    kind = "chat" if chat else "base"
    if "quantization_config" in config:
        kind += f" {config['quantization_config']['bits']}-bit GPTQ"
    logger.info("wrote a Qwen2ForCausalLM %s checkpoint to %s", kind, dst)
    return dst


def _prepare_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConversionError("the destination must differ from the source directory")
    existing = sorted({p for pattern in _CHECKPOINT_FILES for p in dst.glob(pattern)}) if dst.is_dir() else []
    if existing and not force:
        raise ConversionError(
            f"destination {dst} already holds a checkpoint ({existing[0].name}, ...); "
            "pass --force (force=True) to overwrite it"
        )
    for path in existing:
        if path.name != "config.json":
            path.unlink()


# --------------------------------------------------------------------------- helpers


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(size))
        if match is None:
            raise ValueError(f"cannot read {size!r} as a size (e.g. 5GB, 500MB, 2GiB)")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper().rstrip("B") or "B"
        scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
        scale |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
        value = int(number * scale[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}") from None


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc="converting", disable=not enabled)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); restore it from the checkpoint's source") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the source")
    return data


def _read_config(path: Path) -> dict:
    """A Qwen-1 ``config.json`` with the first release's names (``n_embd``, ``n_head``,
    ``padded_vocab_size``, ...) mapped onto the current ones, as the model loads it."""
    from .configuration_qwen import QWenConfig

    raw = _read_json(path)
    if raw.get("model_type") not in (None, "qwen"):
        return raw  # check_convertible says what is wrong
    try:
        config = QWenConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path}: {error}") from None
    return config.to_dict()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
