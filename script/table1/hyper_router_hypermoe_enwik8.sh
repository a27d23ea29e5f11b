#!/usr/bin/env bash
# enwik8, column HyperRouter+HyperMoE: test bits per character at k = 1, 2, 4, 8, 16
#
# Both ideas together: the HyperRouter column's router and schedule (hypernetwork 256, k from 8 to
# 16) and HyperMoE's HyperExpert (sizes of its GPT-2 scripts) in every MoE layer. With k >= 8 a
# batch may hold thousands of distinct expert sets; the HyperExpert is still generated once per set,
# and each token then gathers its adapter (about 1.5 GB per layer at batch 22 x 512 in fp32).
# No auxiliary loss: HyperRouter's published scripts train none, and HyperMoE's published
# 0.01 x (cv^2 importance + cv^2 load) belongs to its noisy top-k router (the load term is the smooth
# estimate of that router's noise); --importance_loss 0.01 adds HyperMoE's importance term alone.
# Small Transformer-XL (4 layers, d_model 256), 400k steps of batch 22 (paper Table A1).
#
# Usage (from anywhere): bash script/table1/hyper_router_hypermoe_enwik8.sh [more train.py flags, which win]
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
    --moe --moe-num-expert 16 --moe-top-k 2 \
    --gate_name HyperRouterGate \
    --hyper_size 256 \
    --moe_index 0,1,2,3 \
    --dynamic_moe \
    --dynamic_moe_mode linear_increase \
    --moe-top-k-min 8 \
    --moe-top-k-max 16 \
    --moe_variant hypermoe \
    --hypermoe_emb_dim 128 \
    --hypermoe_hidden 128 \
    --hypermoe_layer_emb_dim 10 \
    --hypermoe_adapter_dim 64 \
    --work_dir runs/table1-enwik8/Hyper-Router-HyperMoE-Enwik8 \
    "$@"
