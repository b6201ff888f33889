"""Chat with a Qwen-1 -Chat model in the terminal.

    python cli_demo.py                               # Qwen/Qwen-7B-Chat from the Hugging Face Hub
    python cli_demo.py -c /path/to/Qwen-1_8B-Chat    # a local checkpoint directory
    python -m qwen tiny /tmp/qwen-tiny-chat --chat   # or a tiny random one, offline
    python cli_demo.py -c /tmp/qwen-tiny-chat

Answers are streamed as they are generated. Type :h at the prompt for the commands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from qwen.demo_utils import (
    ChatSession,
    CheckpointError,
    SettingError,
    check_weights,
    config_settings,
    first_line,
    load_chat_generation_config,
    load_chat_model,
    resolve_checkpoint,
)

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
DEFAULT_SYSTEM = "You are a helpful assistant."  # as in qwen.qwen_generation_utils
DEFAULT_SEED = 1234
PROMPT, CONTINUATION_PROMPT, ANSWER_PREFIX = "User> ", " ...> ", "Qwen: "

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


def format_config(config) -> str:
    lines = ["Generation config (:conf key=value changes it, :reset-conf restores the checkpoint's):"]
    lines += [f"  {key} = {value!r}" for key, value in config_settings(config).items()]
    lines.append("key=none sets transformers' default (temperature=1.0, top_k=50, top_p=1.0, ...).")
    return "\n".join(lines)


def format_history(history: list[tuple[str, str]]) -> str:
    width = min(shutil.get_terminal_size().columns, 100)
    lines = [f" History ({len(history)} turn{'' if len(history) == 1 else 's'}) ".center(width, "=")]
    for index, (query, response) in enumerate(history):
        lines += [f"User[{index}]: {query}", f"Qwen[{index}]: {response}"]
    return "\n".join([*lines, "=" * width])


def clear_screen() -> None:
    if os.name == "nt":
        os.system("cls")
    elif sys.stdout.isatty():
        print("\033[H\033[2J\033[3J", end="", flush=True)


def read_message() -> str:
    """One message; a line ending in a backslash continues on the next line.

    Raises EOFError (Ctrl-D) and KeyboardInterrupt (Ctrl-C) for the caller.
    """
    lines, prompt = [], PROMPT
    while True:
        try:
            line = input(prompt)
            bad = False
        except UnicodeDecodeError:
            bad = True
        # stdin decodes with errors="surrogateescape" (main): invalid bytes arrive as lone surrogates.
        if bad or any("\udc80" <= ch <= "\udcff" for ch in line):
            print("[ERROR] the input is not valid text in the terminal's encoding; type it again")
            lines, prompt = [], PROMPT
            continue
        if not line.endswith("\\"):
            return "\n".join([*lines, line]).strip()
        lines.append(line[:-1])
        prompt = CONTINUATION_PROMPT


class Session:
    """The terminal around a ChatSession: reads messages and commands, prints answers."""

    def __init__(self, chat: ChatSession, banner: str):
        self.chat, self.banner = chat, banner

    def run(self) -> int:
        print(self.banner)
        while True:
            try:
                message = read_message()
            except (EOFError, KeyboardInterrupt):
                print("\nBye.")
                return 0
            if message.startswith(":") and not message.startswith("::"):
                if self.command(message[1:].strip()) == "quit":
                    print("Bye.")
                    return 0
            elif message:
                self.answer(message[1:] if message.startswith("::") else message)

    def command(self, text: str) -> str | None:
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "q"):
            return "quit"
        try:
            if name in ("help", "h"):
                print(HELP)
            elif name in ("clear", "cl"):
                clear_screen()
                print(self.banner)
            elif name in ("clear-history", "clear-his", "clh"):
                turns = self.chat.clear_history()
                print(f"[INFO] history cleared ({turns} turn{'' if turns == 1 else 's'} forgotten)")
            elif name in ("history", "his"):
                print(format_history(self.chat.history))
            elif name == "seed" and rest:
                print(f"[INFO] random seed set to {self.chat.set_seed(rest)}")
            elif name == "seed":
                print(f"[INFO] random seed: {self.chat.seed}")
            elif name == "conf" and rest:
                for key, value in self.chat.configure(rest).items():
                    print(f"[INFO] {key} = {value!r}")
            elif name in ("conf", "reset-conf"):
                if name == "reset-conf":
                    self.chat.reset_config()
                    print("[INFO] generation config reset to the checkpoint's")
                print(format_config(self.chat.config))
            else:
                print(
                    f"[ERROR] unknown command :{name}; :h lists the commands (start a message with :: to send a colon)"
                )
        except SettingError as error:
            print(f"[ERROR] {error}; nothing changed (:conf and :seed show the current settings)")
        return None

    def answer(self, query: str) -> None:
        print(ANSWER_PREFIX, end="", flush=True)
        shown, stream = "", self.chat.stream(query)
        try:
            for partial in stream:
                print(partial[len(shown) :], end="", flush=True)  # each item extends the previous one
                shown = partial
        except KeyboardInterrupt:
            stream.close()  # stops generation after the current token
            print("\n[INFO] answer interrupted; the partial answer is not kept in the history\n")
            return
        except Exception as error:  # a setting generate() rejects, out of memory, ...
            stream.close()
            print(f"\n[ERROR] generation failed: {first_line(error)}\n")
            return
        print("\n")


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
    for stream in (sys.stdout, sys.stderr):  # answers hold any character; never crash on a narrow console
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if hasattr(sys.stdin, "reconfigure"):
        # Bad bytes become lone surrogates, refused line by line (read_message), instead of
        # a decoding error that would discard every line read ahead with them.
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        checkpoint, is_local = resolve_checkpoint(args.checkpoint_path)
        generation_config = load_chat_generation_config(checkpoint, is_local)
        if is_local:
            check_weights(checkpoint)  # a cut-short or missing weights file, named before loading
        print(f"Loading {checkpoint} ...", flush=True)
        model, tokenizer = load_chat_model(checkpoint, is_local, args.cpu_only)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    device, dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    banner = BANNER.format(checkpoint=checkpoint, device=device, dtype=dtype, seed=args.seed)
    try:
        return Session(ChatSession(model, tokenizer, generation_config, args.seed, args.system), banner).run()
    except KeyboardInterrupt:  # a second Ctrl-C while an interrupted answer winds down
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
