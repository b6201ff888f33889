#!/usr/bin/env bash
# LoRA finetuning on one GPU, without DeepSpeed (the LoRA recipe of finetune_lora_ds.sh).
# Pick the GPU with CUDA_VISIBLE_DEVICES. Usage: finetune/common.sh, docs/finetune.md.
#   bash finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen-7B-Chat -d data.json -o output_qwen
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
GPUS_PER_NODE=1
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"

launch \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True
