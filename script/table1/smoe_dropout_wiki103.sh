#!/usr/bin/env bash
# Paper Table 1, WikiText-103, column SMoE-Dropout: test perplexity at k = 1, 2, 4, 8, 16
#
# A random linear router frozen at initialisation (--freeze_gate); k grows linearly from 8 to 16
# over training as in the original scripts (the paper text says from 2).
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/smoe_dropout_wiki103.sh [more train.py flags, which win]
#   DATA=path/to/data (relative to the repository root)  N_GPU=4 (torchrun)  PYTHON=python3
#   --max_step N shortens the run and its schedules alike; DEVICE=cpu to train more than 10000 steps on the CPU
#   Runs go to runs/table1-wt103/ (tensorboard --logdir runs/table1-wt103 shows them side by side); to resume
#   one, the same command with --restart --restart_dir RUN
set -euo pipefail
source "$(dirname "$0")/../launch.sh"
launch train.py \
    --data "${DATA:-data/wikitext-103/}" \
    --dataset wt103 \
    --n_layer 4 \
    --d_model 256 \
    --n_head 8 \
    --d_head 64 \
    --d_inner 512 \
    --dropout 0.1 \
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
    --moe --moe-num-expert 16 --moe-top-k 2 \
    --gate_name CustomNaiveGate \
    --freeze_gate \
    --moe_index 0,1,2,3 \
    --dynamic_moe \
    --dynamic_moe_mode linear_increase \
    --moe-top-k-min 8 \
    --moe-top-k-max 16 \
    --work_dir runs/table1-wt103/SMoE-Dropout-Wiki103 \
    "$@"
