#!/usr/bin/env bash
# Q-LoRA on one GPU, without DeepSpeed (a GPTQ -Int4 checkpoint, or NF4 via bitsandbytes; see
# finetune_qlora_ds.sh).
# Also runs on a CPU-only machine (slowly): GPUS_PER_NODE=1 and -- --bf16 False.
#   bash finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen-7B-Chat -d data.json -o output_qwen
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
GPUS_PER_NODE=1
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"

launch \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True \
    --q_lora True
