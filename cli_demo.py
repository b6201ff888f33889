"""Chat with a Qwen-1 -Chat model in the terminal.

    python cli_demo.py                               # Qwen/Qwen-7B-Chat from the Hugging Face Hub
    python cli_demo.py -c /path/to/Qwen-1_8B-Chat    # a local checkpoint directory
    python -m qwen tiny /tmp/qwen-tiny-chat --chat   # or a tiny random one, offline
    python cli_demo.py -c /tmp/qwen-tiny-chat

Answers are streamed as they are generated. Type :h at the prompt for the commands.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import gc
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
DEFAULT_SYSTEM = "You are a helpful assistant."  # as in qwen.qwen_generation_utils
DEFAULT_SEED = 1234

PROMPT = "User> "
CONTINUATION_PROMPT = " ...> "
ANSWER_PREFIX = "Qwen: "

BANNER = """\
Qwen-Chat in the terminal: {checkpoint} on {device} ({dtype}), seed {seed}.
Type a message and press Enter; end a line with \\ to continue the message on the next line.
Commands: :h help  :q quit  :cl clear screen  :clh clear history  :his history  :seed [N]  :conf [key=value]
Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits."""

HELP = """\
Commands:
  :help / :h               show this help
  :exit / :quit / :q       quit (so do Ctrl-C and Ctrl-D at the prompt)
  :clear / :cl             clear the screen
  :clear-history / :clh    forget the conversation so far (also :clear-his)
  :history / :his          show the conversation so far
  :seed                    show the random seed
  :seed N                  set the random seed (it is applied before every answer)
  :conf                    show the generation config
  :conf key=value ...      change it, e.g. :conf max_new_tokens=256 temperature=0.7 do_sample=true
  :reset-conf              restore the checkpoint's generation config
Messages:
  End a line with \\ to continue the message on the next line.
  Start a message with :: to send text that begins with a colon: "::-)" sends ":-)".
  Ctrl-C while an answer is streaming stops it; the partial answer is dropped from the history."""

# Types and ranges of the settings people change most; other GenerationConfig keys take any
# Python literal and are checked by GenerationConfig.validate().
_INT, _FLOAT, _BOOL = "an integer", "a number", "true or false"
SETTING_TYPES = {
    "max_new_tokens": _INT,
    "min_new_tokens": _INT,
    "max_length": _INT,
    "min_length": _INT,
    "max_window_size": _INT,
    "top_k": _INT,
    "num_beams": _INT,
    "no_repeat_ngram_size": _INT,
    "temperature": _FLOAT,
    "top_p": _FLOAT,
    "min_p": _FLOAT,
    "typical_p": _FLOAT,
    "repetition_penalty": _FLOAT,
    "length_penalty": _FLOAT,
    "max_time": _FLOAT,
    "epsilon_cutoff": _FLOAT,
    "eta_cutoff": _FLOAT,
    "do_sample": _BOOL,
    "use_cache": _BOOL,
    "renormalize_logits": _BOOL,
    "remove_invalid_values": _BOOL,
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
# Settings the chat loop relies on.
FIXED_SETTINGS = {
    "chat_format": "the demo needs a chat model (chat_format 'chatml')",
    "num_return_sequences": "the demo shows one answer per message",
    "return_dict_in_generate": "the chat API manages generate()'s outputs itself",
    "transformers_version": "it records the file's origin, not a setting",
}


class CheckpointError(Exception):
    """A checkpoint the demo cannot use; the message is shown as it is."""


class ConfError(ValueError):
    """A bad :conf argument; the message is shown as it is."""


# --------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a directory (a hub name is ``[org/]name``)."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve_checkpoint(name: str) -> tuple[str, bool]:
    """``(path or hub name, is_local)``; raises CheckpointError for a path that is no checkpoint."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file; -c wants a checkpoint directory or a Hugging Face Hub name")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{name} is not a checkpoint directory: it has no config.json")
        return str(path), True
    if _looks_like_path(name):
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    return name, False


def _hub_error(name: str, error: BaseException) -> CheckpointError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return CheckpointError(
            f"{name!r} is not a local directory, and as a Hugging Face Hub model it is not in the local cache; "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded (unset HF_HUB_OFFLINE, or pass a local directory with -c)"
        )
    return CheckpointError(
        f"{name!r} is not a local directory, and loading it from the Hugging Face Hub failed: {_first_line(error)}"
    )


def _local_model_type(checkpoint: str) -> str | None:
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_chat_generation_config(checkpoint: str, is_local: bool):
    """The checkpoint's generation config; raises CheckpointError unless it is a chat (ChatML) one."""
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
            raise CheckpointError(f"cannot read the generation config of {checkpoint}: {_first_line(error)}") from error
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


def load_model_and_tokenizer(checkpoint: str, is_local: bool, cpu_only: bool):
    """The tokenizer and the model in eval mode: bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen-1 classes with the Auto factories)

    if torch.cuda.is_available() and not cpu_only:
        # dtype None: the library picks bf16 where CUDA supports it, else fp16 (or the config's precision flag).
        options = {"device_map": "auto", "dtype": None}
    else:
        options = {"device_map": "cpu", "dtype": torch.float32}
    from qwen.qwen_generation_utils import call_off_main_thread

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        # Off the main thread: chat_stream generates in a thread of its own, 10-20% slower
        # when the main thread keeps OpenMP workers (see call_off_main_thread).
        model = call_off_main_thread(lambda: AutoModelForCausalLM.from_pretrained(checkpoint, **options).eval())
    except OSError as error:
        if is_local:
            raise CheckpointError(f"cannot load {checkpoint}: {_first_line(error)}") from error
        raise _hub_error(checkpoint, error) from error
    except (ValueError, ImportError, RuntimeError) as error:  # bad layout, missing package, out of memory
        raise CheckpointError(f"cannot load {checkpoint}: {_first_line(error)}") from error
    return model, tokenizer


# --------------------------------------------------------------------------- :conf


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


def check_setting(config, key: str, value: Any) -> Any:
    """``value`` for ``config.key``, converted (int -> float) and checked; raises ConfError."""
    if key in FIXED_SETTINGS:
        raise ConfError(f"{key} cannot be changed here: {FIXED_SETTINGS[key]}")
    known = sorted(({k for k in vars(config) if not k.startswith("_")} | set(QWEN_SETTINGS)) - set(FIXED_SETTINGS))
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfError(f"unknown generation setting {key!r}{hint}; :conf lists the current ones")
    if value is None:
        # generate() fills a None setting from the checkpoint's generation config, so
        # "unset" is written out as transformers' own default value.
        if key == "stop_words_ids":
            return []
        default = _transformers_defaults().get(key)
        if default is None and getattr(config, key, None) is not None:
            raise ConfError(
                f"{key} has no transformers default to return to: give a value "
                "(:reset-conf restores the checkpoint's settings)"
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
            raise ConfError(f"stop_words_ids must be a list of token-id lists, e.g. [[151643], [3, 4]]; got {value!r}")
        return [list(words) for words in value]
    kind = SETTING_TYPES.get(key)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT and not is_int:
        raise ConfError(f"{key} must be {kind}, got {value!r}")
    if kind == _FLOAT and not (is_int or isinstance(value, float)):
        raise ConfError(f"{key} must be {kind}, got {value!r}")
    if kind == _BOOL and not isinstance(value, bool):
        raise ConfError(f"{key} must be {kind}, got {value!r}")
    if key in SETTING_RANGES:
        accept, wanted = SETTING_RANGES[key]
        if not accept(value):
            raise ConfError(f"{key} must be {wanted}, got {value!r}")
    return float(value) if kind == _FLOAT else value


def _transformers_defaults() -> dict:
    """transformers' own default of each generate() setting it has one for
    (``temperature`` 1.0, ``top_k`` 50, ``top_p`` 1.0, ...)."""
    from transformers import GenerationConfig

    read = getattr(GenerationConfig(), "_get_default_generation_params", None)
    return dict(read()) if read is not None else {}


def split_assignments(text: str) -> list[str]:
    """``"a=1 b=[1, 2]"`` -> ``["a=1", "b=[1, 2]"]``: a new pair starts at whitespace before ``name=``."""
    return [part for part in re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", text.strip()) if part]


def updated_config(config, text: str):
    """A copy of ``config`` with the ``key=value`` pairs of ``text`` applied (all or none); raises ConfError."""
    new = copy.deepcopy(config)
    changes = {}
    for pair in split_assignments(text):
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise ConfError(f"cannot read {pair!r}: write key=value, e.g. :conf max_new_tokens=256")
        changes[key] = check_setting(new, key, parse_value(raw))
    for key, value in changes.items():
        setattr(new, key, value)
    try:
        new.validate(strict=False)
    except (ValueError, TypeError) as error:
        raise ConfError(_first_line(error)) from error
    return new, changes


def format_config(config) -> str:
    settings = {k: v for k, v in config.to_dict().items() if v is not None and not k.startswith("_")}
    settings.pop("transformers_version", None)
    lines = ["Generation config (:conf key=value changes it, :reset-conf restores the checkpoint's):"]
    lines += [f"  {key} = {value!r}" for key, value in sorted(settings.items())]
    lines.append("key=none sets transformers' default (temperature=1.0, top_k=50, top_p=1.0, ...).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- terminal


def clear_screen() -> None:
    if os.name == "nt":
        os.system("cls")
    elif sys.stdout.isatty():
        print("\033[H\033[2J\033[3J", end="", flush=True)


def format_history(history: list[tuple[str, str]]) -> str:
    width = min(shutil.get_terminal_size().columns, 100)
    turns = f"{len(history)} turn" + ("" if len(history) == 1 else "s")
    lines = [f" History ({turns}) ".center(width, "=")]
    for index, (query, response) in enumerate(history):
        lines.append(f"User[{index}]: {query}")
        lines.append(f"Qwen[{index}]: {response}")
    lines.append("=" * width)
    return "\n".join(lines)


def read_message() -> str:
    """One message; a line ending in a backslash continues on the next line.

    Raises EOFError (Ctrl-D) and KeyboardInterrupt (Ctrl-C) for the caller.
    """
    lines = []
    prompt = PROMPT
    while True:
        try:
            line = input(prompt)
            # stdin decodes with errors="surrogateescape" (main): invalid bytes arrive as
            # lone surrogates.
            if any("\udc80" <= ch <= "\udcff" for ch in line):
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "undecodable bytes")
        except UnicodeDecodeError:
            print("[ERROR] the input is not valid text in the terminal's encoding; type it again")
            lines, prompt = [], PROMPT
            continue
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = CONTINUATION_PROMPT
            continue
        lines.append(line)
        return "\n".join(lines).strip()


# --------------------------------------------------------------------------- the session


class Session:
    def __init__(self, model, tokenizer, generation_config, seed: int, system: str, banner: str):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_config = generation_config
        self.config = copy.deepcopy(generation_config)
        self.seed = seed
        self.system = system
        self.banner = banner
        self.history: list[tuple[str, str]] = []

    def run(self) -> int:
        print(self.banner)
        while True:
            try:
                message = read_message()
            except (EOFError, KeyboardInterrupt):
                print("\nBye.")
                return 0
            if not message:
                continue
            if message.startswith("::"):
                self.answer(message[1:])
            elif message.startswith(":"):
                if self.command(message[1:].strip()) == "quit":
                    print("Bye.")
                    return 0
            else:
                self.answer(message)

    def command(self, text: str) -> str | None:
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "q"):
            return "quit"
        if name in ("help", "h"):
            print(HELP)
        elif name in ("clear", "cl"):
            clear_screen()
            print(self.banner)
        elif name in ("clear-history", "clear-his", "clh"):
            turns = len(self.history)
            print(f"[INFO] history cleared ({turns} turn{'' if turns == 1 else 's'} forgotten)")
            self.history.clear()
            _collect_garbage()
        elif name in ("history", "his"):
            print(format_history(self.history))
        elif name == "seed":
            self.set_seed(rest)
        elif name == "conf":
            self.conf(rest)
        elif name == "reset-conf":
            self.config = copy.deepcopy(self.checkpoint_config)
            print("[INFO] generation config reset to the checkpoint's")
            print(format_config(self.config))
        else:
            print(f"[ERROR] unknown command :{name}; :h lists the commands (start a message with :: to send a colon)")
        return None

    def set_seed(self, text: str) -> None:
        if not text:
            print(f"[INFO] random seed: {self.seed}")
            return
        try:
            seed = int(text)
        except ValueError:
            seed = -1
        if not 0 <= seed < 2**32:
            print(f"[ERROR] the seed must be an integer from 0 to 2**32-1, got {text!r}; it stays {self.seed}")
            return
        self.seed = seed
        print(f"[INFO] random seed set to {seed}")

    def conf(self, text: str) -> None:
        if not text:
            print(format_config(self.config))
            return
        try:
            self.config, changes = updated_config(self.config, text)
        except ConfError as error:
            print(f"[ERROR] {error}; nothing changed")
            return
        for key, value in changes.items():
            print(f"[INFO] {key} = {value!r}")

    def answer(self, query: str) -> None:
        from transformers import set_seed

        set_seed(self.seed)
        print(ANSWER_PREFIX, end="", flush=True)
        shown = ""
        stream = None
        try:
            stream = self.model.chat_stream(
                self.tokenizer, query, history=self.history, system=self.system, generation_config=self.config
            )
            for partial in stream:
                print(partial[len(shown) :], end="", flush=True)  # each item extends the previous one
                shown = partial
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # stops generation after the current token
            print("\n[INFO] answer interrupted; the partial answer is not kept in the history\n")
            return
        except Exception as error:  # a setting generate() rejects, out of memory, ...
            if stream is not None:
                stream.close()
            print(f"\n[ERROR] generation failed: {_first_line(error)}\n")
            return
        print("\n")
        self.history.append((query, shown))


def _collect_garbage() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Chat with a Qwen-1 -Chat model in the terminal; answers are streamed as they are generated.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--checkpoint-path",
        default=DEFAULT_CKPT_PATH,
        metavar="CHECKPOINT",
        help="a -Chat checkpoint: local directory or Hugging Face Hub name (default: %(default)s)",
    )
    parser.add_argument(
        "-s",
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="random seed, applied before every answer (default: %(default)s)",
    )
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument(
        "--system", default=DEFAULT_SYSTEM, metavar="TEXT", help="the system prompt (default: %(default)r)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.seed < 2**32:
        print(f"error: the seed must be from 0 to 2**32-1, got {args.seed}", file=sys.stderr)
        return 2
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # answers hold any character; never crash on a narrow console
            stream.reconfigure(errors="replace")
    if hasattr(sys.stdin, "reconfigure"):
        # Bad bytes become lone surrogates, refused line by line (read_message), instead of
        # a decoding error that would discard every line read ahead with them.
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        checkpoint, is_local = resolve_checkpoint(args.checkpoint_path)
        generation_config = load_chat_generation_config(checkpoint, is_local)
        print(f"Loading {checkpoint} ...", flush=True)
        model, tokenizer = load_model_and_tokenizer(checkpoint, is_local, args.cpu_only)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    banner = BANNER.format(
        checkpoint=checkpoint,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        seed=args.seed,
    )
    try:
        return Session(model, tokenizer, generation_config, args.seed, args.system, banner).run()
    except KeyboardInterrupt:  # a second Ctrl-C while an interrupted answer winds down
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
