"""Quantize a Qwen-1 checkpoint (a full or merged-LoRA finetune) to GPTQ Int4/Int8.

    python run_gptq.py --model_name_or_path Qwen-7B-Chat-finetuned --data_path data.json \
        --out_path Qwen-7B-Chat-finetuned-Int4 --bits 4

``--data_path`` is a file in the finetuning data format (a JSON list or JSON Lines of
``{"conversations": [{"from": "user", "value": ...}, {"from": "assistant", ...}]}``); each
conversation becomes one calibration sample, as the ChatML text the model sees. The output
directory loads as it is (``AutoModelForCausalLM.from_pretrained(out_path,
trust_remote_code=True)`` or this package's ``QWenLMHeadModel``): config.json with the
official ``quantization_config``, model.safetensors, tokenizer files, generation config and
remote code. Needs ``pip install -e ".[gptq]"`` (optimum and gptqmodel). Format and
measurements: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="checkpoint to quantize (full or merged LoRA)")
    parser.add_argument("--data_path", required=True, help="calibration data in the finetuning format (JSON/JSONL)")
    parser.add_argument("--out_path", required=True, help="directory to write the quantized checkpoint to")
    parser.add_argument("--max_len", type=int, default=8192, help="calibration sample length limit (default 8192)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="4 (Int4) or 8 (Int8); default 4")
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128, help="default 128")
    parser.add_argument(
        "--damp_percent", type=float, default=0.01, help="GPTQ dampening (default 0.01, as the original)"
    )
    parser.add_argument("--max_samples", type=int, default=None, help="use only the first N conversations")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pathlib import Path

    out = Path(args.out_path)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; choose a new --out_path", file=sys.stderr)
        return 2
    try:
        from qwen import QWenTokenizer
        from qwen.quantization import calibration_samples, quantize_checkpoint

        tokenizer = QWenTokenizer.from_pretrained(args.model_name_or_path)
        samples = calibration_samples(args.data_path, tokenizer, max_len=args.max_len, limit=args.max_samples)
        print(f"{len(samples)} calibration samples, {sum(map(len, samples))} tokens")
        quantize_checkpoint(
            args.model_name_or_path,
            samples,
            out,
            bits=args.bits,
            group_size=args.group_size,
            damp_percent=args.damp_percent,
        )
    except ImportError as err:
        print(f"error: {err}; install the GPTQ extra: pip install -e '.[gptq]'", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
