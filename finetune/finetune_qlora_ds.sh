#!/usr/bin/env bash
# Q-LoRA with DeepSpeed ZeRO-2: LoRA on an official -Int4/-Int8 GPTQ checkpoint as stored
# (needs optimum and gptqmodel), or on a bf16 checkpoint quantized on the fly to 4-bit NF4
# by bitsandbytes (docs/finetune.md). Recipe as finetune_lora_ds.sh.
#   bash finetune/finetune_qlora_ds.sh -m Qwen/Qwen-7B-Chat-Int4 -d data.json -o output_qwen
set -euo pipefail
# shellcheck source=finetune/common.sh
source "$(dirname "$0")/common.sh"
DS_CONFIG="${DS_CONFIG:-$REPO/finetune/ds_config_zero2.json}"

launch \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True \
    --q_lora True \
    --deepspeed "$DS_CONFIG"
