#!/usr/bin/env bash
# WikiText-103, column X-MoE (beyond the paper): test perplexity at k = 1, 2, 4, 8, 16
#
# X-MoE (Chi et al. 2022): routing scores cos(W h, e_i) / tau between the token projected to 16
# dimensions and L2-normalised expert embeddings, tau learnable from 0.07; top-2 with the gate
# values renormalised over the two, and the balance loss at 0.01 (--balance_loss 0.01, summed over
# layers), as the reference GPT recipe (torchscale: --moe-gate-loss-wt 0.01, top-2,
# --moe-normalize-gate-prob-before-dropping). Not taken from that recipe: its random dropping of
# the second expert (GShard's policy) and its expert capacity (ours is dropless).
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1), dropout 0.1
# (paper C.1).
#
# Usage (from anywhere): bash script/table1/xmoe_wiki103.sh [more train.py flags, which win]
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
    --gate_name xmoe \
    --xmoe_dim 16 \
    --xmoe_temperature 0.07 \
    --balance_loss 0.01 \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-wt103/XMoE-Wiki103 \
    "$@"
