#!/usr/bin/env bash
# Full-parameter finetuning with DeepSpeed ZeRO-3 (the original recipe: lr 1e-5, 5 epochs,
# 16 accumulated steps of 1 sample per GPU, 512 tokens), saving a consolidated bf16
# checkpoint in the official layout. Usage and settings: finetune/common.sh, docs/finetune.md.
#   bash finetune/finetune_ds.sh -m Qwen/Qwen-7B -d data.json -o output_qwen
set -euo pipefail
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"
DS_CONFIG="${DS_CONFIG:-$REPO/finetune/ds_config_zero3.json}"

launch \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --learning_rate 1e-5 \
    --deepspeed "$DS_CONFIG"
