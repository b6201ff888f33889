"""Finetune a Qwen-1 checkpoint: full, LoRA or Q-LoRA, on one device or with DeepSpeed.

    python finetune.py --model_name_or_path Qwen/Qwen-1_8B-Chat --data_path data.json \
        --output_dir out --use_lora True --bf16 True

The launch scripts in finetune/ hold the recommended settings; docs/finetune.md is the
guide; ``python finetune.py --help`` lists every argument.
"""

import sys

from qwen.training import main

if __name__ == "__main__":
    sys.exit(main())
