#!/usr/bin/env bash
# Paper Table 3, BANKING77, row HyperRouter (k=8, k=16): accuracy after dense fine-tuning
#
# A HyperRouter model pretrained by script/table1/hyper_router_enwik8.sh, fine-tuned with all
# 16 experts active and its hypernetwork kept frozen (the router embeddings train), then tested
# at k = 1, 2, 4, 8, 16.
# The pretrained run directory's model_best_dense.pt is used (model_best.pt for a dense run), or the
# checkpoint file given; a checkpoint of another method is refused.
# Paper Table A2: input length 512 bytes, batch 16, Adam, lr 1e-4, 15 epochs; as in the original
# fine-tuning scripts, dropout 0.1, cosine decay of the learning rate, gradient clipping 0.25.
# The test set (3,080 queries) is reported.
#
# Usage (from anywhere):
#   bash script/table2/banking77/hyper_router.sh PRETRAINED_RUN_OR_CHECKPOINT [more finetune.py flags, which win]
#   FT_DATA=data/finetune (holds banking77/ from script/get_finetune_data.sh; relative to the repository root)
#   PYTHON=python3
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash $0 PRETRAINED_RUN_OR_CHECKPOINT [more finetune.py flags]" >&2
    exit 2
fi
PRETRAINED=$1
[[ "$PRETRAINED" == /* ]] || PRETRAINED="$PWD/$PRETRAINED"    # launch.sh moves to the repository root
shift
source "$(dirname "$0")/../../launch.sh"
launch finetune.py \
    --pretrained "$PRETRAINED" \
    --method hyper_router \
    --task banking77 \
    --data "${FT_DATA:-data/finetune}/banking77" \
    --eval_split test \
    --max_len 512 \
    --pool mean \
    --batch_size 16 \
    --optim adam \
    --lr 0.0001 \
    --scheduler cosine \
    --warmup_step 0 \
    --clip 0.25 \
    --epochs 15 \
    --dropout 0.1 \
    --eval_ks 1,2,4,8,16 \
    --seed 1111 \
    --work_dir runs/finetune/hyper_router \
    "$@"
