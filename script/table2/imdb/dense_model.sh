#!/usr/bin/env bash
# Paper Table 3, IMDB, row Dense (or Dense+Dropout): accuracy after dense fine-tuning
#
# A dense model pretrained by script/table1/directly_dense_enwik8.sh (row Dense) or
# directly_dense_dropout_enwik8.sh (row Dense+Dropout; the row is named after the
# checkpoint's pretraining dropout): one FFN as wide as the 16 experts, so there is no k.
# The pretrained run directory's model_best_dense.pt is used (model_best.pt for a dense run), or the
# checkpoint file given; a checkpoint of another method is refused.
# Paper Table A2: input length 512 bytes, batch 4, Adam, lr 1e-4, 3 epochs; as in the original
# fine-tuning scripts, dropout 0.1, cosine decay of the learning rate, gradient clipping 0.25.
# The test set (25,000 reviews) is reported.
#
# Usage (from anywhere):
#   bash script/table2/imdb/dense_model.sh PRETRAINED_RUN_OR_CHECKPOINT [more finetune.py flags, which win]
#   FT_DATA=data/finetune (holds imdb/ from script/get_finetune_data.sh; relative to the repository root)
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
    --method dense \
    --task imdb \
    --data "${FT_DATA:-data/finetune}/imdb" \
    --eval_split test \
    --max_len 512 \
    --pool mean \
    --batch_size 4 \
    --optim adam \
    --lr 0.0001 \
    --scheduler cosine \
    --warmup_step 0 \
    --clip 0.25 \
    --epochs 3 \
    --dropout 0.1 \
    --eval_ks 1,2,4,8,16 \
    --seed 1111 \
    --work_dir runs/finetune/dense_model \
    "$@"
