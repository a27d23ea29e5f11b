#!/usr/bin/env bash
# Every routing method on the built-in synthetic corpus at the demo's scale (script/demo.sh's model,
# recipe and STEPS), tested at k = 1, 2, 4, 8, 16: one table of test bits per character with the
# corpus's exact floor. The methods and their flags come from the methods table (methods.py): by default
# every registered router (moe.ROUTERS, a router of one's own in ROUTER_FILES too) and SMoE+HyperMoE, the
# HyperExpert on SMoE's router as in script/demo.sh, so that its column differs from SMoE's by the
# HyperExpert alone (HyperMoE on its published noisy top-k router is the method `hypermoe`). A method
# trained at one fixed k is shown from the checkpoint validated at that k, its own k marked '*' (the top-1
# methods THOR, Switch, Hash and DTS-Gate at k = 1); the dynamic-k methods (SMoE-Dropout, HyperRouter: k
# from 8 to 16) from the all-expert one. Each method trains with its own defaults (auxiliary losses, capacity).
#
# Usage: bash script/demo_routers.sh [more train.py flags for every run]
#   METHODS="smoe thor" (default: every router and smoe_hypermoe; `python methods.py` lists them all)
#   WORK=runs/demo_routers  and script/demo.sh's STEPS=500  DATA=data/synthetic  PYTHON=python
#   SEEDS="1111 1112 1113"
set -euo pipefail
EXTRA=("$@")
WORK=${WORK:-runs/demo_routers}
source "$(dirname "$0")/demo_common.sh"

# method -> its train.py flags (on top of the demo's, whose k is 2), from the methods table; '+dynamic_k'
# stands for the demo's k range
declare -A METHOD_FLAGS=()
ALL=()
ROUTERS=()                                               # the methods that are a registered router alone
while IFS=$'\t' read -r key _column flags; do
    [[ " $flags " == *" --moe "* ]] || continue          # the demo's model is an MoE (no dense baseline)
    METHOD_FLAGS[$key]=${flags/+dynamic_k/${DYNAMIC_K[*]}}
    ALL+=("$key")
    if [[ " $flags " == *" --gate_name $key "* ]]; then ROUTERS+=("$key"); fi
done < <("$PYTHON" methods.py)
read -ra methods <<< "${METHODS:-${ROUTERS[*]} smoe_hypermoe}"

# every method is checked before anything trains
for method in "${methods[@]}"; do
    if [[ -z "${METHOD_FLAGS[$method]:-}" ]]; then
        echo "error: unknown method '$method' in METHODS; choose from: ${ALL[*]}" >&2
        exit 2
    fi
done

runs=()
for method in "${methods[@]}"; do
    read -ra flags <<< "${METHOD_FLAGS[$method]}"
    runs+=("$(train "$method" "${flags[@]}")")
done
mapfile -t runs < <(printf '%s\n' "${runs[@]}")        # one element per run directory

echo
echo "Test bits per character on the synthetic corpus, every router (each run's checkpoint validated at its training k):"
"$PYTHON" eval.py --table_checkpoint training_k --table "${runs[@]}"
echo "Run directories: ${runs[*]}"
echo "wall time: $SECONDS s"
