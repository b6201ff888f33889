"""An OpenAI-compatible API server for Qwen-1 chat models, with continuous batching.

    pip install -e ".[serve]"      # in the repository: the package with fastapi, uvicorn, sse-starlette
    python openai_api.py -c Qwen/Qwen-7B-Chat --server-port 8000

Then use any OpenAI client with ``base_url="http://127.0.0.1:8000/v1"``. Endpoints:
/v1/chat/completions (tools / functions through ReAct), /v1/completions, /v1/models,
/health; OpenAPI docs at /docs. See docs/openai_api.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

# What `pip install -e ".[serve]"` adds (the modules they are imported as).
SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "starlette")


def _size(text: str) -> int:
    """A byte count such as 1048576, 512K, 4M or 1G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    scale = units.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (examples: 1048576, 512K, 4M)") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint-path", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--server-name", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="weights dtype; auto: the checkpoint's on CPU (bf16 for the official ones), the library's choice on CUDA",
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--api-auth", metavar="USER:PASSWORD", help="accept HTTP basic auth with these on /v1/*")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most requests decoded together (default 16)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="most requests waiting for a batch slot; then 429 (default 64)"
    )
    parser.add_argument(
        "--max-model-len", type=int, help="most prompt + completion tokens per request (default: config seq_length)"
    )
    parser.add_argument(
        "--max-prefill-tokens", type=int, default=4096, help="most padded prompt tokens per prefill (default 4096)"
    )
    parser.add_argument(
        "--no-pack-weights",
        action="store_true",
        help="on CPUs with native bf16 (AVX512-BF16/AMX), skip the oneDNN-packed second copy of the weights "
        "that makes batched decoding steps about 40%% faster: half the memory, slower batches",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_size,
        help="largest request body accepted, in bytes (suffixes K, M, G); larger ones get a 413 before they are "
        "read (default: 64 bytes per token of context, at least 1M)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--served-model-name", help="model id in replies (default: the checkpoint's directory name)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--enable-test-hooks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        # an unset $KEY in a launch script must not quietly open the server
        parser.error("--api-key is empty: give a key, or leave the option out to serve without one")
    if args.api_auth is not None:
        user, colon, password = args.api_auth.partition(":")
        if not colon or not user or not password:
            parser.error("--api-auth must be USER:PASSWORD with neither part empty")
    # Checked here, before minutes of loading a model, rather than by the engine after it.
    for flag, value, least in (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-queue", args.max_queue, 0),
        ("--max-model-len", args.max_model_len, 1),
        ("--max-prefill-tokens", args.max_prefill_tokens, 1),
        ("--threads", args.threads, 0),
        ("--max-body-bytes", args.max_body_bytes, 1),
    ):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from qwen.demo_utils import CheckpointError
        from qwen.serving.app import create_app, load_engine
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        print(
            f"error: {error}; install the server's packages: pip install -e '.[serve]' in the repository "
            "(or pip install fastapi uvicorn sse-starlette)",
            file=sys.stderr,
        )
        return 2

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        engine = load_engine(
            args.checkpoint_path,
            cpu_only=args.cpu_only,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_model_len=args.max_model_len,
            max_prefill_tokens=args.max_prefill_tokens,
            pack_weights=not args.no_pack_weights,
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    name = args.served_model_name or args.checkpoint_path.rstrip("/").split("/")[-1]
    app = create_app(
        engine,
        served_model_name=name,
        api_key=args.api_key,
        api_auth=args.api_auth,
        enable_test_hooks=args.enable_test_hooks,
        max_body_bytes=args.max_body_bytes,
    )
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
