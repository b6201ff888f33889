#!/usr/bin/env bash
# Q-LoRA with DeepSpeed ZeRO-2: LoRA on the checkpoint quantized on the fly to 4-bit NF4 by
# bitsandbytes (pass a bf16 checkpoint; the official -Int4 GPTQ checkpoints need the GPTQ
# loader, not available yet: docs/finetune.md). Recipe as finetune_lora_ds.sh.
#   bash finetune/finetune_qlora_ds.sh -m Qwen/Qwen-7B-Chat -d data.json -o output_qwen
set -euo pipefail
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"
DS_CONFIG="${DS_CONFIG:-$REPO/finetune/ds_config_zero2.json}"

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
    --q_lora True \
    --deepspeed "$DS_CONFIG"
