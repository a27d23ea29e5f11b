#!/usr/bin/env bash
# Every routing method on the built-in synthetic corpus at the demo's scale (script/demo.sh's model,
# recipe and STEPS), tested at k = 1, 2, 4, 8, 16: one table of test bits per character with the
# corpus's exact floor. A method trained at one fixed k is shown from the checkpoint validated at that k,
# its own k marked '*' (the top-1 methods THOR, Switch, Hash and DTS-Gate at k = 1); the dynamic-k methods
# (SMoE-Dropout, HyperRouter: k from 8 to 16) from the all-expert one. Each method trains with its own
# defaults (auxiliary losses, capacity); HyperMoE sits on the SMoE router, as in script/demo.sh, so its
# column differs from SMoE's by the HyperExpert alone (its paper-scale scripts use its noisy top-k router).
#
# Usage: bash script/demo_routers.sh [more train.py flags for every run]
#   METHODS="smoe thor" (default: every method below)  WORK=runs/demo_routers
#   and script/demo.sh's STEPS=500  DATA=data/synthetic  PYTHON=python  SEEDS="1111 1112 1113"
set -euo pipefail
EXTRA=("$@")
WORK=${WORK:-runs/demo_routers}
source "$(dirname "$0")/demo_common.sh"

# method -> its train.py flags (on top of the demo's, whose k is 2); the router is the one after --gate_name
ORDER=(smoe smoe_dropout hyper_router thor hypermoe switch gshard noisy_topk hash xmoe dts)
declare -A METHOD_FLAGS=(
    [smoe]="--gate_name smoe"
    [smoe_dropout]="--gate_name smoe_dropout ${DYNAMIC_K[*]}"
    [hyper_router]="--gate_name hyper_router --hyper_size 256 ${DYNAMIC_K[*]}"
    [thor]="--gate_name thor --moe-top-k 1 --thor_alpha 5.0 --thor_inference random"
    [hypermoe]="--gate_name smoe --moe_variant hypermoe"
    [switch]="--gate_name switch --moe-top-k 1"
    [gshard]="--gate_name gshard --moe-top-k 2"
    [noisy_topk]="--gate_name noisy_topk"
    [hash]="--gate_name hash --moe-top-k 1"
    [xmoe]="--gate_name xmoe"
    [dts]="--gate_name dts --moe-top-k 1"
)
read -ra methods <<< "${METHODS:-${ORDER[*]}}"

# every method and its router are checked before anything trains
known_routers=$("$PYTHON" -c 'import moe; print(*moe.ROUTERS)')
for method in "${methods[@]}"; do
    if [[ -z "${METHOD_FLAGS[$method]:-}" ]]; then
        echo "error: unknown method '$method' in METHODS; choose from: ${ORDER[*]}" >&2
        exit 2
    fi
    read -ra flags <<< "${METHOD_FLAGS[$method]}"
    router=${flags[1]}
    if [[ " $known_routers " != *" $router "* ]]; then
        echo "error: method '$method' routes with '$router', which is not in moe.ROUTERS ($known_routers);" \
             "merge the branch that adds it, or leave the method out with METHODS=\"...\"" >&2
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
