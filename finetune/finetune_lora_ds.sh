#!/usr/bin/env bash
# LoRA finetuning with DeepSpeed ZeRO-2 (the original recipe: r 64, alpha 16, dropout 0.05
# on c_attn/c_proj/w1/w2; lr 3e-4, 5 epochs, 8 accumulated steps of 2 samples per GPU, 512
# tokens). Base checkpoints also train wte and lm_head. Writes the adapter; merge it with
# `python -m qwen merge-lora OUTPUT MERGED`. Usage: finetune/common.sh, docs/finetune.md.
#   bash finetune/finetune_lora_ds.sh -m Qwen/Qwen-7B-Chat -d data.json -o output_qwen
set -euo pipefail
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"
DS_CONFIG="${DS_CONFIG:-$REPO/finetune/ds_config_zero2.json}"

launch \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True \
    --deepspeed "$DS_CONFIG"
