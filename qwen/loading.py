"""How a Qwen-1 checkpoint is loaded: precision flags, dtype, attention backend, key checks.

The official checkpoints choose their precision with ``bf16``/``fp16``/``fp32`` flags (in
``config.json`` or passed to ``from_pretrained``) and their attention with
``use_flash_attn``; :func:`load_kwargs` turns those into the ``dtype`` and
``attn_implementation`` that ``PreTrainedModel.from_pretrained`` understands.

Part of the self-contained remote-code set: imports its siblings relatively only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from typing import Any

import torch
from transformers import PretrainedConfig

from .configuration_qwen import PRECISION_FLAGS, QWenConfig

logger = logging.getLogger(__name__)

DTYPE_OF_FLAG = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_HALF = {"BF16": torch.bfloat16, "F16": torch.float16}
# from_pretrained arguments that say where the checkpoint is; the config needs them too
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_HUB_KWARGS += ("trust_remote_code",)


def load_kwargs(checkpoint, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments with the Qwen-1 precision flags resolved.

    ``bf16=True``, ``fp16=True`` or ``fp32=True`` (or the same keys in ``config.json``)
    select the dtype; with none set, bf16 is used where CUDA supports it, else fp16 on
    CUDA, else fp32. ``dtype=``/``torch_dtype=`` (``"auto"``: the stored dtype) also work.
    The config's ``use_flash_attn`` chooses flash-attention-2 where it can run, SDPA
    otherwise. Returns new kwargs with ``config``, ``dtype`` and ``attn_implementation`` set.
    """
    kwargs = dict(kwargs)
    flags = {f: kwargs.pop(f) for f in PRECISION_FLAGS if f in kwargs}
    # for transformers' quantizer (merged with the checkpoint's own), not a config attribute
    quantization_config = kwargs.pop("quantization_config", None)
    dtype = kwargs.pop("dtype", None)
    legacy_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else legacy_dtype
    config = kwargs.pop("config", None)
    if not isinstance(config, PretrainedConfig):  # a path, or None
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config, kwargs = QWenConfig.from_pretrained(config or checkpoint, return_unused_kwargs=True, **kwargs)
        kwargs.update(hub)
    for flag, value in flags.items():
        setattr(config, flag, bool(value))
    config.validate_qwen()
    if isinstance(dtype, str) and dtype == "auto":  # as in transformers: the stored dtype
        dtype = None if config.precision_flag else stored_dtype(checkpoint, config)
    dtype = resolve_dtype(config, dtype, explicit_flags=any(flags.values()))
    if "attn_implementation" not in kwargs and config._attn_implementation_internal is None:
        kwargs["attn_implementation"] = choose_attention(config, dtype, kwargs.get("device_map"))
    stored_quantization = getattr(config, "quantization_config", None)
    if quantization_config is None and _quant_method(stored_quantization) == "gptq":
        quantization_config = cpu_gptq_config(stored_quantization, kwargs.get("device_map"))
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if _quant_method(quantization_config or stored_quantization) == "gptq":
        prepare_gptqmodel()
    return {**kwargs, "config": config, "dtype": dtype}


def _quant_method(quantization_config) -> str | None:
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method)).lower()


def cpu_gptq_config(stored, device_map):
    """For a GPTQ checkpoint loaded on CPU with no ``quantization_config`` given: gptqmodel's
    ``gptq_torch`` backend, whose modules take the CPU engine's one-row kernel (exact to
    the stored weights). gptqmodel's own CPU choice for 4 bits repacks every weight on first
    use and decodes about 7x slower. ``None`` (the checkpoint's settings as they are) for
    other devices."""
    on_cpu = device_map in ("cpu", {"": "cpu"}) or (device_map is None and not torch.cuda.is_available())
    if not on_cpu:
        return None
    from transformers import GPTQConfig

    bits = stored.get("bits") if isinstance(stored, dict) else getattr(stored, "bits", None)
    logger.info("GPTQ checkpoint on CPU: gptqmodel's gptq_torch backend (pass quantization_config to choose)")
    return GPTQConfig(bits=bits, backend="gptq_torch")


def prepare_gptqmodel() -> None:
    """Set ``GPTQMODEL_CPU_WORKERS`` (unless the user did) before gptqmodel builds its worker
    pools: half the cores, as gptqmodel chooses, but at least 2, since its model-loader pool
    asks the CPU pool for 2 workers (with 1, on a 2-core machine, loading fails with a
    worker-pool ``ValueError``)."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        workers = max(2, min(12, ((os.cpu_count() or 1) + 1) // 2))
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(workers)
        logger.info("GPTQMODEL_CPU_WORKERS=%d (set it to choose gptqmodel's CPU workers yourself)", workers)


def resolve_dtype(config: QWenConfig, dtype, explicit_flags: bool) -> torch.dtype:
    """The dtype to load in: ``dtype`` if given (it must agree with a flag passed beside
    it), else the config's precision flag, else the best the machine supports. The
    choice is not written back as a flag: a checkpoint saved after an automatic choice
    (fp32 on a CPU) still chooses for itself where it is loaded next."""
    flag = config.precision_flag
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None and dtype != "auto":
        if explicit_flags and flag is not None and DTYPE_OF_FLAG[flag] != dtype:
            raise ValueError(f"dtype={dtype} contradicts {flag}=True; pass only one of them")
        return dtype
    if flag is not None:
        return DTYPE_OF_FLAG[flag]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def stored_dtype(checkpoint, config: QWenConfig | None = None) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its precision flag, else its
    config's ``dtype``, else that of the first tensor of its safetensors files; float32
    where none of them says bf16 or fp16 (``pytorch_model.bin`` checkpoints without
    either)."""
    from transformers.utils import cached_file

    if config is None:
        config = QWenConfig.from_pretrained(checkpoint)
    flag = config.precision_flag
    stored = DTYPE_OF_FLAG[flag] if flag else getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored is None:

        def find(name):
            return cached_file(checkpoint, name, _raise_exceptions_for_missing_entries=False)

        found, index = None, find("model.safetensors.index.json")
        if index is not None:
            with open(index) as f:
                found = find(next(iter(json.load(f)["weight_map"].values())))
        else:
            found = find("model.safetensors")
        if found is not None:
            with open(found, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            tags = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
            stored = _SAFETENSORS_HALF.get(tags[0]) if tags else None
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def choose_attention(config: QWenConfig, dtype: torch.dtype, device_map) -> str:
    """``flash_attention_2`` where ``use_flash_attn`` allows it and it can run, else ``sdpa``
    (with a warning where ``use_flash_attn=True`` asked for it)."""
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


def check_loaded_keys(checkpoint, config: QWenConfig, info: dict) -> None:
    """Raise ``ValueError`` where the checkpoint's weights do not match the model (missing,
    unexpected or shape-mismatched names): a Qwen-1 model must not run on randomly
    initialised weights. Quantized checkpoints are checked by their quantizer."""
    if getattr(config, "quantization_config", None) is not None:
        return
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
            f"checkpoint {checkpoint!s} does not match the Qwen-1 layout "
            f"({'; '.join(problems)}); refusing to run on randomly initialised weights"
        )
