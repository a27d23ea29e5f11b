#!/usr/bin/env bash
# enwik8, column DTS-Gate (beyond the paper): test bits per character at k = 1, 2, 4, 8, 16
#
# DTS-Gate (Nie et al. 2021, EvoMoE): a linear router whose Gumbel-softmax weights, at a temperature
# decaying exponentially from 1.0 to 0.5 over the first 200k steps (half the run; EvoMoE's flag defaults
# --max-temperature 1.0, --min-temperature 0.5), send each token to every expert with weight above 0.001
# (its code's threshold; dense at first, sparser as the temperature falls), then to its top-1 expert
# (EvoMoE's final sparse gate) for the last 200k steps; evaluation routes by the top k of the logits
# without noise. Gate values softmax(logits) at temperature 1 in training and evaluation (EvoMoE's
# default, without --use-gumbel-gates). No auxiliary loss, as EvoMoE's released LM command (its
# criterion is cross_entropy). EvoMoE's expert-diversify phase (one expert trained, then copied)
# is not part of this script: every run here starts from 16 random experts.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1), dropout 0.1
# (paper C.1).
#
# Usage (from anywhere): bash script/table1/dts_enwik8.sh [more train.py flags, which win]
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
    --gate_name dts \
    --dts_max_temp 1.0 \
    --dts_min_temp 0.5 \
    --dts_anneal_steps 200000 \
    --dts_threshold 0.001 \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-enwik8/DTSGate-Enwik8 \
    "$@"
