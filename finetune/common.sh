# shellcheck shell=bash
# Shared by the finetune/*.sh launch scripts (sourced, not run): reads the paths and the
# launch settings, and defines `launch`, which starts finetune.py under torchrun.
#
# Paths: -m MODEL (checkpoint directory or Hub name), -d DATA (training data), -o OUTPUT
# (output directory), or the variables MODEL, DATA, OUTPUT. Everything after `--` goes to
# finetune.py unchanged and, coming last, overrides the recipe (e.g. -- --bf16 False).
# Launch settings: GPUS_PER_NODE (default: the visible GPUs, at least 1), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6001), PYTHON (python),
# DS_CONFIG (the script's DeepSpeed config).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-Qwen/Qwen-7B}"
DATA="${DATA:-path_to_data.json}"
OUTPUT="${OUTPUT:-output_qwen}"
EXTRA_ARGS=()

usage() {
    echo "usage: $0 [-m MODEL] [-d DATA] [-o OUTPUT] [-- FINETUNE_ARGS...]" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -m | --model) MODEL="$2"; shift 2 ;;
        -d | --data) DATA="$2"; shift 2 ;;
        -o | --output) OUTPUT="$2"; shift 2 ;;
        -h | --help) usage ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6001}"

# The settings every recipe shares (the original's): bf16, 5 epochs, weight decay 0.1, Adam
# beta2 0.95, 1% warmup (a ratio in transformers 5) then a cosine schedule, 512 tokens,
# gradient checkpointing, lazy preprocessing, a checkpoint every 1000 steps (10 kept).
COMMON_ARGS=(
    --bf16 True
    --num_train_epochs 5
    --per_device_eval_batch_size 1
    --save_strategy steps
    --save_steps 1000
    --save_total_limit 10
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01
    --lr_scheduler_type cosine
    --logging_steps 1
    --report_to none
    --model_max_length 512
    --gradient_checkpointing True
    --lazy_preprocess True
)

# launch ARGS...: finetune.py with the paths, the shared settings, ARGS (the recipe's own)
# and the extra arguments; a later argument overrides an earlier one.
launch() {
    "$PYTHON" -m torch.distributed.run \
        --nproc_per_node "$GPUS_PER_NODE" \
        --nnodes "$NNODES" \
        --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" \
        --master_port "$MASTER_PORT" \
        "$REPO/finetune.py" \
        --model_name_or_path "$MODEL" \
        --data_path "$DATA" \
        --output_dir "$OUTPUT" \
        "${COMMON_ARGS[@]}" \
        "$@" \
        "${EXTRA_ARGS[@]}"
}
