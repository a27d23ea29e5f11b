#!/usr/bin/env bash
# Paper Table 1, enwik8, column Dense (the k = 16 row): test bits per character
#
# One dense FFN as wide as the 16 experts together (d_inner 16 x 512), no dropout.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/directly_dense_enwik8.sh [more train.py flags, which win]
#   DATA=path/to/data (relative to the repository root)  N_GPU=4 (torchrun)  PYTHON=python3
#   --max_step N shortens the run and its schedules alike; DEVICE=cpu to train more than 10000 steps on the CPU
#   Runs go to runs/table1-enwik8/ (tensorboard --logdir runs/table1-enwik8 shows them side by side); to resume
#   one, the same command with --restart --restart_dir RUN
set -euo pipefail
source "$(dirname "$0")/../launch.sh"
launch train.py \
    --data "${DATA:-data/enwik8/}" \
    --dataset enwik8 \
    --n_layer 4 \
    --d_model 256 \
    --n_head 8 \
    --d_head 64 \
    --d_inner 8192 \
    --dropout 0.0 \
    --dropatt 0.0 \
    --optim adam \
    --lr 0.00025 \
    --warmup_step 0 \
    --max_step 400000 \
    --tgt_len 512 \
    --mem_len 512 \
    --eval_tgt_len 128 \
    --batch_size 22 \
    --eval-interval 4000 \
    --seed 1111 \
    --work_dir runs/table1-enwik8/Directly_Dense_Training-Enwik8 \
    "$@"
