"""What the chat scripts share (``cli_demo.py``, ``web_demo.py``, ``openai_api.py``).

- finding the checkpoint named on the command line (a local directory or a Hugging Face
  Hub name) and checking its files before minutes of loading: :func:`resolve_checkpoint`,
  :func:`check_weights`;
- loading a chat checkpoint, its generation config and tokenizer: :func:`load_chat_model`,
  :func:`load_chat_generation_config`;
- typed generation settings given as ``key=value`` text: :func:`updated_config`.

Every problem a user can fix is raised as :class:`CheckpointError` or :class:`SettingError`
with a one-line message that names the file or setting and the fix; the scripts print it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_LFS_POINTER = b"version https://git-lfs"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and what to do."""


class SettingError(ValueError):
    """A generation setting that cannot be applied; the message says why."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- checkpoint files


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a directory (a hub name is ``[org/]name``)."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    )


def read_json_file(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; raises CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{path} is not a JSON text file ({error.reason}); restore it from the checkpoint's source"
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            "restore it from the checkpoint's source (download it again)"
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the source")
    return data


def resolve_checkpoint(name: str) -> tuple[str, bool]:
    """``(path or hub name, is_local)`` for a ``-c`` argument.

    A local directory must hold a readable ``config.json`` (and, where present, readable
    ``generation_config.json`` and ``tokenizer_config.json``); a name that can only be a
    path must exist. Anything else is taken as a Hugging Face Hub name.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file; give a checkpoint directory or a Hugging Face Hub name")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{name} is not a checkpoint directory: it has no config.json")
        for file in ("config.json", "generation_config.json", "tokenizer_config.json"):
            if (path / file).exists():
                read_json_file(path / file)
        return str(path), True
    if _looks_like_path(name):
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    return name, False


def _check_not_lfs_pointer(path: Path, head: bytes) -> None:
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(
            f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in {path.parent} "
            "(or download the checkpoint with huggingface-cli)"
        )


def _check_safetensors(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a whole safetensors file (header and data)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        _check_not_lfs_pointer(path, handle.read(len(_LFS_POINTER)))
        handle.seek(0)
        head = handle.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= size - 8 or header_len > 100_000_000:
            header = None
        else:
            try:
                header = json.loads(handle.read(header_len))
            except ValueError:
                header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file or is cut short ({size:,} bytes); download it again")
    offsets = [
        info.get("data_offsets") for key, info in header.items() if key != "__metadata__" and isinstance(info, dict)
    ]
    ends = [int(pair[1]) for pair in offsets if isinstance(pair, list) and len(pair) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path} is incomplete: {size:,} of {expected:,} bytes (an interrupted download?); download it again"
        )


def check_weights(checkpoint: str | os.PathLike) -> None:
    """Raise CheckpointError unless the local ``checkpoint`` has whole weight files.

    Reads only headers: a missing weights file or shard, a Git LFS pointer in place of the
    weights and a cut-short safetensors file are caught here, named, before loading.
    """
    ckpt = Path(checkpoint)
    if (ckpt / "adapter_config.json").is_file():
        return  # a PEFT adapter: its base model's weights are loaded from elsewhere
    present = [name for name in WEIGHT_FILES if (ckpt / name).is_file()]
    if not present:
        raise CheckpointError(f"{ckpt} has no weights ({', '.join(WEIGHT_FILES)}); download the checkpoint again")
    name = present[0]  # the file transformers loads: safetensors first, one file before an index
    if name.endswith(".index.json"):
        index = read_json_file(ckpt / name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{ckpt / name} has no weight_map; restore it from the checkpoint's source")
        shards = sorted(set(map(str, weight_map.values())))
        missing = [shard for shard in shards if not (ckpt / shard).is_file()]
        if missing:
            raise CheckpointError(
                f"{ckpt / missing[0]} is missing ({len(missing)} of the {len(shards)} shards listed in {name}); "
                "download the checkpoint again"
            )
        files = [ckpt / shard for shard in shards]
    else:
        files = [ckpt / name]
    for file in files:
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        else:
            with open(file, "rb") as handle:
                _check_not_lfs_pointer(file, handle.read(len(_LFS_POINTER)))


# --------------------------------------------------------------------------- loading


def _hub_error(name: str, error: BaseException) -> CheckpointError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return CheckpointError(
            f"{name!r} is not a local directory, and as a Hugging Face Hub model it is not in the local cache; "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded (unset HF_HUB_OFFLINE, or pass a local directory with -c)"
        )
    return CheckpointError(
        f"{name!r} is not a local directory, and loading it from the Hugging Face Hub failed: {first_line(error)}"
    )


def load_error(checkpoint: str, is_local: bool, error: BaseException) -> CheckpointError:
    """The CheckpointError to raise for ``error``, raised while loading ``checkpoint``."""
    if type(error).__name__ == "SafetensorError":  # a damaged file in the Hugging Face cache
        return CheckpointError(
            f"a weights file of {checkpoint} cannot be read ({first_line(error)}); download the checkpoint again"
        )
    if isinstance(error, OSError) and not is_local:
        return _hub_error(checkpoint, error)
    return CheckpointError(f"cannot load {checkpoint}: {first_line(error)}")


def is_load_error(error: BaseException) -> bool:
    """Whether loading raised ``error`` for a problem with the checkpoint, a missing package
    or too little memory (anything else is a bug, and keeps its traceback)."""
    return isinstance(error, (OSError, ValueError, ImportError, RuntimeError)) or (
        type(error).__name__ == "SafetensorError"
    )


@contextlib.contextmanager
def loading_errors(checkpoint: str, is_local: bool):
    """Turn what loading ``checkpoint`` raises for the user to fix into CheckpointError."""
    try:
        yield
    except Exception as error:
        if not is_load_error(error):
            raise
        raise load_error(checkpoint, is_local, error) from error


def _local_model_type(checkpoint: str) -> str | None:
    try:
        return read_json_file(Path(checkpoint) / "config.json").get("model_type")
    except CheckpointError:
        return None


def load_chat_generation_config(checkpoint: str, is_local: bool):
    """The checkpoint's ``GenerationConfig``; raises CheckpointError unless it is a chat (ChatML) one."""
    from transformers import GenerationConfig

    if is_local and not (Path(checkpoint) / "generation_config.json").is_file():
        raise CheckpointError(
            f"{checkpoint} has no generation_config.json; Qwen-1 -Chat checkpoints ship one with "
            "chat_format 'chatml' (copy it from the -Chat model your checkpoint was finetuned from)"
        )
    try:
        config = GenerationConfig.from_pretrained(checkpoint)
    except OSError as error:
        if is_local:
            raise CheckpointError(f"cannot read the generation config of {checkpoint}: {first_line(error)}") from error
        raise _hub_error(checkpoint, error) from error
    chat_format = getattr(config, "chat_format", None)
    model_type = _local_model_type(checkpoint) if is_local else None
    if chat_format != "chatml" and model_type == "qwen2":
        raise CheckpointError(
            f"{checkpoint} is a Qwen2-layout export (convert-qwen2), which this demo does not run: it is "
            "for engines that speak Qwen2 (vLLM, llama.cpp, ...) or transformers' apply_chat_template; "
            "point the demo at the Qwen-1 checkpoint it was exported from"
        )
    if chat_format != "chatml":
        raise CheckpointError(
            f"{checkpoint} is not a chat model: its generation config has chat_format={chat_format!r}, not 'chatml' "
            "(a base model such as Qwen/Qwen-7B); use a -Chat checkpoint such as Qwen/Qwen-7B-Chat"
        )
    return config


def load_chat_model(checkpoint: str, is_local: bool, cpu_only: bool = False):
    """``(model, tokenizer)``, the model in eval mode: bf16 (fp16 where bf16 is unsupported)
    on CUDA, float32 on the CPU. Raises CheckpointError for what the user can fix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen-1 classes with the Auto factories)
    from qwen.qwen_generation_utils import call_off_main_thread

    if torch.cuda.is_available() and not cpu_only:
        # dtype None: the library picks bf16 where CUDA supports it, else fp16 (or the config's precision flag).
        options = {"device_map": "auto", "dtype": None}
    else:
        options = {"device_map": "cpu", "dtype": torch.float32}
    if is_local:
        check_weights(checkpoint)
    with loading_errors(checkpoint, is_local):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        # Off the main thread: chat_stream generates in a thread of its own, 10-20% slower
        # when the main thread keeps OpenMP workers (see call_off_main_thread).
        model = call_off_main_thread(lambda: AutoModelForCausalLM.from_pretrained(checkpoint, **options).eval())
    return model, tokenizer


# --------------------------------------------------------------------------- generation settings

# Types and ranges of the settings people change most; other GenerationConfig keys take any
# Python literal and are checked by GenerationConfig.validate().
_INT, _FLOAT, _BOOL = "an integer", "a number", "true or false"
SETTING_TYPES = {
    **dict.fromkeys(
        "max_new_tokens min_new_tokens max_length min_length max_window_size top_k num_beams "
        "no_repeat_ngram_size".split(),
        _INT,
    ),
    **dict.fromkeys(
        "temperature top_p min_p typical_p repetition_penalty length_penalty max_time epsilon_cutoff "
        "eta_cutoff".split(),
        _FLOAT,
    ),
    **dict.fromkeys("do_sample use_cache renormalize_logits remove_invalid_values".split(), _BOOL),
}
SETTING_RANGES = {
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "min_new_tokens": (lambda v: v >= 0, "0 or more"),
    "max_length": (lambda v: v >= 1, "at least 1"),
    "min_length": (lambda v: v >= 0, "0 or more"),
    "max_window_size": (lambda v: v >= 1, "at least 1"),
    "top_k": (lambda v: v >= 0, "0 or more (0 turns top-k filtering off)"),
    "num_beams": (lambda v: v >= 1, "at least 1"),
    "no_repeat_ngram_size": (lambda v: v >= 0, "0 or more"),
    "temperature": (lambda v: v > 0, "greater than 0"),
    "top_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "min_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "typical_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "repetition_penalty": (lambda v: v > 0, "greater than 0"),
    "max_time": (lambda v: v > 0, "greater than 0 (seconds)"),
    "epsilon_cutoff": (lambda v: 0 <= v < 1, "at least 0 and less than 1"),
    "eta_cutoff": (lambda v: 0 <= v < 1, "at least 0 and less than 1"),
}
# Read by the Qwen chat API on top of transformers' own settings (absent from some checkpoints).
QWEN_SETTINGS = ("max_window_size", "stop_words_ids")
# Settings a chat front end relies on.
FIXED_SETTINGS = {
    "chat_format": "a chat needs a chat model (chat_format 'chatml')",
    "num_return_sequences": "a chat shows one answer per message",
    "return_dict_in_generate": "the chat API manages generate()'s outputs itself",
    "transformers_version": "it records the file's origin, not a setting",
}


def parse_value(text: str) -> Any:
    """A Python literal; true/false/none in any case; anything else is a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.strip()


def _transformers_defaults() -> dict:
    """transformers' own default of each generate() setting it has one for
    (``temperature`` 1.0, ``top_k`` 50, ``top_p`` 1.0, ...)."""
    from transformers import GenerationConfig

    read = getattr(GenerationConfig(), "_get_default_generation_params", None)
    return dict(read()) if read is not None else {}


def check_setting(config, key: str, value: Any) -> Any:
    """``value`` for ``config.key``, converted (int -> float) and checked; raises SettingError.

    ``None`` stands for transformers' own default (``generate()`` would fill a None from the
    checkpoint's generation config again).
    """
    if key in FIXED_SETTINGS:
        raise SettingError(f"{key} cannot be changed here: {FIXED_SETTINGS[key]}")
    known = sorted(({k for k in vars(config) if not k.startswith("_")} | set(QWEN_SETTINGS)) - set(FIXED_SETTINGS))
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SettingError(f"unknown generation setting {key!r}{hint}")
    if value is None:
        if key == "stop_words_ids":
            return []
        default = _transformers_defaults().get(key)
        if default is None and getattr(config, key, None) is not None:
            raise SettingError(
                f"{key} has no transformers default to return to: give a value "
                "(resetting restores the checkpoint's settings)"
            )
        return default
    if key == "stop_words_ids":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(words, (list, tuple))
            and words
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in words)
            for words in value
        )
        if not ok:
            raise SettingError(
                f"stop_words_ids must be a list of token-id lists, e.g. [[151643], [3, 4]]; got {value!r}"
            )
        return [list(words) for words in value]
    kind = SETTING_TYPES.get(key)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if (
        (kind == _INT and not is_int)
        or (kind == _FLOAT and not (is_int or isinstance(value, float)))
        or (kind == _BOOL and not isinstance(value, bool))
    ):
        raise SettingError(f"{key} must be {kind}, got {value!r}")
    if key in SETTING_RANGES:
        accept, wanted = SETTING_RANGES[key]
        if not accept(value):
            raise SettingError(f"{key} must be {wanted}, got {value!r}")
    return float(value) if kind == _FLOAT else value


def split_assignments(text: str) -> list[str]:
    """``"a=1 b=[1, 2]"`` -> ``["a=1", "b=[1, 2]"]``: a new pair starts at whitespace before ``name=``."""
    return [part for part in re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", text.strip()) if part]


def updated_config(config, text: str):
    """``(new config, changes)``: a copy of ``config`` with the ``key=value`` pairs of ``text``
    applied (all or none); raises SettingError."""
    new = copy.deepcopy(config)
    changes = {}
    for pair in split_assignments(text):
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise SettingError(f"cannot read {pair!r}: write key=value, e.g. max_new_tokens=256")
        changes[key] = check_setting(new, key, parse_value(raw))
    for key, value in changes.items():
        setattr(new, key, value)
    try:
        new.validate(strict=False)
    except (ValueError, TypeError) as error:
        raise SettingError(first_line(error)) from error
    return new, changes


def config_settings(config) -> dict[str, Any]:
    """The settings of a generation config that are set, by name (sorted)."""
    settings = {k: v for k, v in config.to_dict().items() if v is not None and not k.startswith("_")}
    settings.pop("transformers_version", None)
    return dict(sorted(settings.items()))


# --------------------------------------------------------------------------- a conversation


class ChatSession:
    """One conversation with a chat model: its history, random seed and generation settings.

    ``stream(query)`` yields the growing answer; the turn joins the history only when the
    answer is complete (a stream closed early, or failing, leaves the history as it was).
    """

    def __init__(
        self, model, tokenizer, generation_config, seed: int = 1234, system: str = "You are a helpful assistant."
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.checkpoint_config = generation_config
        self.config = copy.deepcopy(generation_config)
        self.seed = self.check_seed(seed)
        self.history: list[tuple[str, str]] = []

    @staticmethod
    def check_seed(seed: int | str) -> int:
        """``seed`` as an int from 0 to 2**32-1; raises SettingError."""
        try:
            value = int(seed)
        except (TypeError, ValueError):
            value = -1
        if not 0 <= value < 2**32:
            raise SettingError(f"the seed must be an integer from 0 to 2**32-1, got {seed!r}")
        return value

    def set_seed(self, seed: int | str) -> int:
        self.seed = self.check_seed(seed)
        return self.seed

    def configure(self, text: str) -> dict[str, Any]:
        """Apply ``key=value`` pairs (all or none); the changes, or SettingError."""
        self.config, changes = updated_config(self.config, text)
        return changes

    def reset_config(self) -> None:
        self.config = copy.deepcopy(self.checkpoint_config)

    def clear_history(self) -> int:
        """Forget the conversation; the number of turns forgotten."""
        import gc
        import sys

        turns = len(self.history)
        self.history.clear()
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()
        return turns

    def stream(self, query: str):
        """Yield the answer to ``query`` as it grows (each item extends the previous one),
        sampled after seeding with ``self.seed``. Close the generator to stop generating."""
        from transformers import set_seed

        set_seed(self.seed)
        answer = ""
        chat = self.model.chat_stream(
            self.tokenizer, query, history=self.history, system=self.system, generation_config=self.config
        )
        with contextlib.closing(chat):  # closing stops generation after the current token
            for answer in chat:
                yield answer
        self.history.append((query, answer))
