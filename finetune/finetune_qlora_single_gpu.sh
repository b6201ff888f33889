#!/usr/bin/env bash
# Q-LoRA on one GPU, without DeepSpeed (NF4 via bitsandbytes; see finetune_qlora_ds.sh).
# Also runs on a CPU-only machine (slowly): GPUS_PER_NODE=1 and -- --bf16 False.
#   bash finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen-7B-Chat -d data.json -o output_qwen
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
GPUS_PER_NODE=1
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"

launch \
    --bf16 True \
    --num_train_epochs 5 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --save_strategy steps \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 3e-4 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --report_to none \
    --model_max_length 512 \
    --gradient_checkpointing True \
    --lazy_preprocess True \
    --use_lora True \
    --q_lora True
