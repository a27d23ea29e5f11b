#!/usr/bin/env bash
# The main job in miniature: Table 1 on the built-in synthetic corpus, on a CPU, in about 5 minutes.
#
# Trains small HyperRouter, SMoE-Dropout and SMoE models (2 layers, d_model 64, 16 experts) with the
# paper's recipe (SMoE-Dropout and HyperRouter grow k from 8 to 16 during training, SMoE keeps
# k = 2), then THOR (random routing, k = 1, two passes with a consistency loss) and HyperMoE (the
# SMoE router plus the HyperExpert), tests each at k = 1, 2, 4, 8, 16 and prints the bits per
# character side by side with the corpus's exact floor (its entropy rate). Each run is shown from the
# checkpoint validated at the k it trained at: all experts for HyperRouter and SMoE-Dropout (k grows to
# 16), k = 2 for SMoE and HyperMoE, k = 1 for THOR (eval.py --table_checkpoint training_k).
# With SEEDS="1111 1112 1113" every method is trained once per seed and the table gives mean ± std.
#
# Usage: bash script/demo.sh [more train.py flags for every run]
#   WORK=runs/demo (output folder)  STEPS=500  DATA=data/synthetic  PYTHON=python
#   SEEDS="1111 1112 1113" (default: the one seed 1111, train.py's default)
set -euo pipefail
source "$(dirname "$0")/launch.sh"
WORK=${WORK:-runs/demo}
STEPS=${STEPS:-500}
EXTRA=("$@")
N_RUNS=$(seed_list | wc -l)
N_RUNS=$((N_RUNS > 0 ? N_RUNS : 1))
mkdir -p "$WORK"
COMMON=(--dataset synthetic --data "${DATA:-data/synthetic}"
        --n_layer 2 --d_model 64 --n_head 4 --d_head 16 --d_inner 64 --dropout 0.1
        --tgt_len 64 --mem_len 64 --eval_tgt_len 32 --batch_size 16
        --lr 0.002 --max_step "$STEPS" --eval-interval 250 --log-interval 100 --max_eval_steps 100
        --moe --moe-num-expert 16 --moe-top-k 2)
DYNAMIC_K=(--dynamic_moe --dynamic_moe_mode linear_increase --moe-top-k-min 8 --moe-top-k-max 16)

# train NAME [train.py flags]: one run per seed, their output in $WORK/NAME.log; prints their run directories
train() {
    local name=$1 start=$SECONDS
    shift
    echo "training $name ($STEPS steps, $N_RUNS run(s), log: $WORK/$name.log)" >&2
    launch train.py "${COMMON[@]}" --work_dir "$WORK/$name" "$@" "${EXTRA[@]}" > "$WORK/$name.log" 2>&1 \
        || { echo "$name failed, see $WORK/$name.log" >&2; exit 1; }
    echo "  done in $((SECONDS - start)) s" >&2
    ls -d "$WORK/$name-synthetic"/* | tail -n "$N_RUNS"
}

runs=()
runs+=("$(train hyper_router --gate_name HyperRouterGate --hyper_size 256 "${DYNAMIC_K[@]}")")
runs+=("$(train smoe_dropout --gate_name CustomNaiveGate --freeze_gate "${DYNAMIC_K[@]}")")
runs+=("$(train smoe --gate_name CustomNaiveGate)")
runs+=("$(train thor --gate_name thor --moe-top-k 1 --thor_alpha 5.0 --thor_inference random)")
runs+=("$(train hypermoe --gate_name CustomNaiveGate --moe_variant hypermoe)")
mapfile -t runs < <(printf '%s\n' "${runs[@]}")        # one element per run directory

echo
echo "Test bits per character on the synthetic corpus (each run's checkpoint validated at its training k):"
"$PYTHON" eval.py --table_checkpoint training_k --table "${runs[@]}"
echo "Run directories: ${runs[*]}"
echo "wall time: $SECONDS s"
