#!/usr/bin/env bash
# enwik8, column THOR (a baseline of the paper, in its Table A3 only): test bits per character at k = 1, 2, 4, 8, 16
#
# THOR (Zuo et al. 2022): no router; every token goes to one random expert per layer (k = 1, THOR's
# own setting; THOR's code draws one expert per layer for the whole batch, here every token draws its
# own). Each batch is run twice with independent draws and dropout masks, and the loss is
# (CE1 + CE2 + alpha * CR) / 2, CR the symmetric KL between the two predictive distributions, with
# alpha 5.0 as THOR's released run.sh (--thor_alpha 5.0).
# Inference is random as THOR's (--thor_inference random): at k < 16 each token goes to k random
# experts with weights 1/k, at k = 16 to every expert with weight 1/16 (the only THOR entry of the
# paper: Table A3, FLOPs). --thor_inference average gives the k = 16 model at every k.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/thor_enwik8.sh [more train.py flags, which win]
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
    --gate_name thor \
    --thor_alpha 5.0 \
    --thor_inference random \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-enwik8/THOR-Enwik8 \
    "$@"
