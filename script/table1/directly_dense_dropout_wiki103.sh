#!/usr/bin/env bash
# Paper Table 1, WikiText-103, column Dense+Dropout (the k = 16 row): test perplexity
#
# One dense FFN as wide as the 16 experts together (d_inner 16 x 512), dropout 0.1.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
# The original script of this column alone uses batch 66 for 134,000 steps: about as many
# sequences of 512 (66 x 134,000 = 8.84M vs 22 x 400,000 = 8.80M) in a third of the updates. We
# follow the paper, like the other WikiText-103 columns, so that every column has one schedule;
# append --batch_size 66 --max_step 134000 to run the original's.
#
# Usage (from anywhere): bash script/table1/directly_dense_dropout_wiki103.sh [more train.py flags, which win]
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
    --d_inner 8192 \
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
    --work_dir runs/table1-wt103/Directly_Dense_Dropout_Training-Wiki103 \
    "$@"
