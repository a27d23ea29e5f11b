#!/usr/bin/env bash
# WikiText-103, column Hash (beyond the paper): test perplexity at k = 1, 2, 4, 8, 16
#
# Hash layers (Roller et al. 2021): no router and no load-balancing loss; each token id goes to one
# fixed expert (k = 1, the paper's setting), given by a balanced random hash of the vocabulary (every
# expert gets floor or ceil(V / 16) token ids; Roller et al.'s "balanced" hash balances token
# frequencies instead), drawn from --hash_seed at model construction and saved in the checkpoint.
# Each layer draws its own table. Tested at k > 1 through our extension: a fixed random order of the
# 16 experts per token id, led by its hash, the first k taken with gate values 1/k.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1), dropout 0.1
# (paper C.1).
#
# Usage (from anywhere): bash script/table1/hash_wiki103.sh [more train.py flags, which win]
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
    --moe --moe-num-expert 16 --moe-top-k 1 \
    --gate_name hash \
    --hash_seed 0 \
    --moe_index 0,1,2,3 \
    --work_dir runs/table1-wt103/Hash-Wiki103 \
    "$@"
