"""Command line: ``python -m qwen <command> ...`` (``python -m qwen --help`` lists them)."""

from __future__ import annotations

import argparse
import logging
import sys

from .remote_code import REMOTE_CODE_FILES


def _tiny(args: argparse.Namespace) -> None:
    from .tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(
        args.out_dir,
        chat=args.chat,
        seq_length=args.seq_length,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        intermediate=args.intermediate,
        seed=args.seed,
        dtype=args.dtype,
        tie_word_embeddings=args.tie_word_embeddings,
        force=args.force,
    )
    print(f"wrote a tiny {'chat' if args.chat else 'base'} checkpoint to {out}")


def _update_remote_code(args: argparse.Namespace) -> None:
    from .remote_code import write_remote_code

    backup = write_remote_code(args.ckpt_dir, backup=not args.no_backup)
    print(f"updated the remote code in {args.ckpt_dir}")
    if backup is not None:
        print(f"previous files kept in {backup}")


def _convert_qwen2(args: argparse.Namespace) -> None:
    from .convert import convert_qwen2

    dst = convert_qwen2(
        args.src_dir,
        args.dst_dir,
        dtype=args.dtype,
        max_position=args.max_position,
        rope_scaling=args.rope_scaling,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"wrote a Qwen2ForCausalLM checkpoint to {dst}")


def _merge_lora(args: argparse.Namespace) -> None:
    from .training import merge_lora

    out = merge_lora(args.adapter_dir, args.out_dir, dtype=args.dtype, base=args.base)
    print(f"wrote the merged checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "tiny",
        help="write a tiny random checkpoint in the official layout",
        description="Write a tiny random Qwen-1 checkpoint (config.json, generation_config.json, "
        "model.safetensors, qwen.tiktoken, tokenizer_config.json and the remote code) for "
        "tests and offline examples.",
    )
    p.add_argument("out_dir", help="directory to write (created if missing; refused if not empty, without --force)")
    p.add_argument("--chat", action="store_true", help="chat variant (generation_config chat_format: chatml)")
    p.add_argument("--seq-length", type=int, default=8192, help="trained context length (default 8192)")
    p.add_argument("--layers", type=int, default=2, help="number of blocks (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=int, default=256, help="intermediate_size, twice the MLP width (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="stored dtype (default bf16)")
    p.add_argument("--tie-word-embeddings", action="store_true", help="share wte and lm_head")
    p.add_argument("--force", action="store_true", help="write into OUT_DIR even if it is not empty")
    p.set_defaults(func=_tiny)

    p = sub.add_parser(
        "update-remote-code",
        help="write this package's model files into a checkpoint as its remote code",
        description=f"Copy this package's model files ({', '.join(REMOTE_CODE_FILES)}) into "
        "CKPT_DIR and point the auto_map of config.json and tokenizer_config.json at them, so tools "
        "that load with trust_remote_code=True run the maintained code. Replaced files are first "
        "copied to CKPT_DIR/remote_code_backup-<time>/; files that are symbolic links (a Hugging "
        "Face cache snapshot) are replaced by regular files, their targets left as they were.",
    )
    p.add_argument("ckpt_dir", help="an official-layout Qwen-1 checkpoint directory")
    p.add_argument("--no-backup", action="store_true", help="do not keep copies of replaced files")
    p.set_defaults(func=_update_remote_code)

    p = sub.add_parser(
        "convert-qwen2",
        help="export a checkpoint to the Qwen2 layout (vLLM, SGLang, llama.cpp, plain transformers)",
        description="Convert an official-layout Qwen-1 checkpoint (model.safetensors, sharded safetensors or "
        "pytorch_model*.bin) into a standard Qwen2ForCausalLM checkpoint: renamed weights with c_attn split "
        "into q/k/v, a model_type 'qwen2' config.json, a fast tokenizer (tokenizer.json) with the ChatML chat "
        "template and a generation_config.json. GPTQ Int4/Int8 checkpoints export as Qwen2 GPTQ checkpoints "
        "(c_attn's packed tensors split, integers unchanged). Within seq_length the export computes the same function. "
        "Weights are streamed tensor by tensor. See docs/export.md.",
    )
    p.add_argument("src_dir", help="an official-layout Qwen-1 checkpoint directory")
    p.add_argument("dst_dir", help="directory to write (created if missing)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="dtype of the written weights (default auto: as stored in SRC_DIR)",
    )
    p.add_argument(
        "--max-position",
        type=int,
        default=None,
        metavar="N",
        help="context length to declare (default: the trained seq_length); beyond seq_length the export "
        "does not reproduce Qwen-1's dynamic NTK/logN scaling",
    )
    p.add_argument(
        "--rope-scaling",
        choices=["none", "yarn", "dynamic"],
        default="none",
        help="rope scaling entry for --max-position beyond seq_length, factor N/seq_length (default none)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB); larger models get an index",
    )
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DST_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert_qwen2)

    p = sub.add_parser(
        "merge-lora",
        help="merge a LoRA adapter (finetune.py --use_lora) into a standalone checkpoint",
        description="Load the adapter's base checkpoint, merge the LoRA weights (and the fully trained "
        "modules, wte/lm_head for base models) into it and write a checkpoint in the official layout: "
        "weights, config, generation config, tokenizer files and remote code. See docs/finetune.md.",
    )
    p.add_argument("adapter_dir", help="the adapter directory written by finetune.py")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="dtype of the written weights (default auto: as the base checkpoint stores them)",
    )
    p.set_defaults(func=_merge_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a problem with its arguments or files is one line on stderr, exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as err:  # the library's errors name the file and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
