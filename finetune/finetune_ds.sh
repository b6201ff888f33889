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
    --bf16 True \
    --num_train_epochs 5 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --save_strategy steps \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 1e-5 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --report_to none \
    --model_max_length 512 \
    --gradient_checkpointing True \
    --lazy_preprocess True \
    --deepspeed "$DS_CONFIG"
