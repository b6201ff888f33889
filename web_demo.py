"""Chat with a Qwen-1 -Chat model in the browser.

    pip install -r requirements_web_demo.txt         # or: pip install -e ".[vocab,web]"
    python web_demo.py                               # Qwen/Qwen-7B-Chat from the Hugging Face Hub
    python web_demo.py -c /path/to/Qwen-1_8B-Chat    # a local checkpoint directory
    python -m qwen tiny /tmp/qwen-tiny-chat --chat   # or a tiny random one, offline
    python web_demo.py -c /tmp/qwen-tiny-chat

Then open http://127.0.0.1:8000. Several tabs or users chat at once, each with their own
history; their answers are generated together by one continuous-batching engine (one copy
of the model in memory). See docs/web_demo.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
# What the `web` extra adds (the modules they are imported as).
WEB_PACKAGES = ("gradio",)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-c",
        "--checkpoint-path",
        default=DEFAULT_CKPT_PATH,
        metavar="CHECKPOINT",
        help="a -Chat checkpoint: local directory or Hugging Face Hub name (default: %(default)s)",
    )
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--share", action="store_true", help="also serve the page through a public gradio.live link")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    parser.add_argument("--server-name", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--server-port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="most answers generated together (default: %(default)s)"
    )
    parser.add_argument(
        "--max-model-len", type=int, help="most prompt + answer tokens of one chat (default: the config's seq_length)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="weights dtype; auto: the checkpoint's on CPU (bf16 for the official ones), the library's choice on CUDA",
    )
    parser.add_argument(
        "--system", default=None, help="the initial system prompt (default: You are a helpful assistant.)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    for flag, value, least in (
        ("--server-port", args.server_port, 1),
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-model-len", args.max_model_len, 2),
    ):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # No usage statistics or version checks sent to gradio (set it to True to allow them).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    missing = [module for module in WEB_PACKAGES if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"error: {', '.join(missing)} is not installed: pip install -r requirements_web_demo.txt",
            file=sys.stderr,
        )
        return 1

    from qwen.demo_utils import CheckpointError, load_chat_generation_config, resolve_checkpoint

    try:
        # A missing directory or a base (non-chat) model is named before torch is imported.
        checkpoint, is_local = resolve_checkpoint(args.checkpoint_path)
        generation_config = load_chat_generation_config(checkpoint, is_local)
        from qwen.serving.app import load_engine

        engine = load_engine(
            checkpoint,
            cpu_only=args.cpu_only,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from qwen.web_demo import DEFAULT_SYSTEM, create_demo, launch

    name = os.path.basename(os.path.normpath(checkpoint)) if is_local else checkpoint
    engine.start()
    try:
        demo = create_demo(
            engine,
            generation_config,
            model_name=name,
            system=DEFAULT_SYSTEM if args.system is None else args.system,
        )
        launch(
            demo,
            server_name=args.server_name,
            server_port=args.server_port,
            share=args.share,
            inbrowser=args.inbrowser,
        )
    except KeyboardInterrupt:
        pass
    except OSError as error:  # the port is taken, the address is not this machine's, ...
        print(f"error: cannot serve on {args.server_name}:{args.server_port}: {error}", file=sys.stderr)
        return 1
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
