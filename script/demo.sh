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
EXTRA=("$@")
source "$(dirname "$0")/demo_common.sh"

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
