#!/usr/bin/env bash
# enwik8, column Switch Transformer (Fedus et al. 2022): test bits per character at k = 1, 2, 4, 8, 16
#
# Switch (Fedus et al. 2022): a bias-free linear router, top-1; the gate value is the chosen expert's
# full-softmax probability (not renormalised); in training the router reads x * U(0.99, 1.01)
# (--switch_jitter 0.01, the paper's). The method's defaults come with --gate_name switch: balance loss
# E * sum_e f_e P_e with weight 0.01 and capacity factor 1.25 in training, 2.0 in evaluation (the
# paper's Mesh TensorFlow code), tokens over capacity passing through the residual.
# Dropout 0.1 (paper C.1). Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/switch_enwik8.sh [more train.py flags, which win]
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
    --moe --moe-num-expert 16 --moe-top-k 1 \
    --gate_name switch \
    --switch_jitter 0.01 \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-enwik8/Switch-Enwik8 \
    "$@"
