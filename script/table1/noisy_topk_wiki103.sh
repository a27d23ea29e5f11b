#!/usr/bin/env bash
# WikiText-103, column noisy top-k gating (Shazeer et al. 2017): test perplexity at k = 1, 2, 4, 8, 16
#
# Noisy top-k (Shazeer et al. 2017): clean logits x W_g plus, in training, N(0, 1) * softplus(x W_noise),
# both matrices trainable and zero at the start; top-k of the noisy logits, softmax over the k.
# k = 2 as the SMoE column (the paper's flat MoEs use k = 4). The method's defaults come with
# --gate_name noisy_topk: importance loss cv^2 and the smooth load estimator's cv^2, each with weight
# 0.1 (the paper's w_importance = w_load = 0.1); no capacity limit.
# Dropout 0.1 (paper C.1). Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/noisy_topk_wiki103.sh [more train.py flags, which win]
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
    --gate_name noisy_topk \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-wt103/NoisyTopK-Wiki103 \
    "$@"
