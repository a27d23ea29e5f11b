#!/usr/bin/env bash
# Every figure of docs/analysis.md, and the analysis tables, from trained run directories (on the CPU).
#
#   Figs/fig1_metric_vs_k.png      Figure 1: test metric vs k, one line per method (from results.json)
#   Figs/fig3_framework.png        Figure 3: SMoE, SMoE-Dropout and HyperRouter (drawn, no run needed)
#   Figs/fig4_router_outputs.png   Figure 4: each run's routers' softmax at test token $TOKENS
#   Figs/router_entropy.png        Tables 4 / A5 as bars: entropy of each router's softmax per method
#   Figs/expert_load.png           expert load per router, one panel per method
#   Figs/jacobian_spectra.png      Section 3.3: singular values of the router term, checkpoints init..last
#   Figs/tables.txt                Tables 4/A5 (entropy), A3 (FLOPs), A4 (parameters), load, Jacobian ranks
#
# Usage: bash script/figures.sh RUN_DIR [RUN_DIR ...]
#   e.g. the run directories that script/demo.sh prints at its end. Runs that differ only in seed (SEEDS=...)
#   are one method: Figure 1, the entropy and the load show their mean ± sample std over the seeds (error
#   bars, bands; the load sorted from the most used expert); Figure 4, the Jacobian, FLOPs and parameters
#   use the first run of each method.
#   OUT=Figs  MAX_EVAL_STEPS=100 (test windows for entropy and load; -1: the whole split)  TOKENS=100
#   MAX_TOKENS=2048 (tokens for the Jacobian)  DATA=path (data folder, if not the runs' own)  PYTHON=python
#   PAPER=1 also prints Tables A3 and A4 for the paper's small enwik8 model (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-Figs}
if [ "$#" -eq 0 ]; then
    echo "usage: bash script/figures.sh RUN_DIR [RUN_DIR ...]  (e.g. the runs script/demo.sh prints)" >&2
    exit 2
fi
RUNS=("$@")
DATA_FLAG=()
if [ -n "${DATA:-}" ]; then
    DATA_FLAG=(--data "$DATA")
fi
EVAL=("$PYTHON" eval.py "${DATA_FLAG[@]}")
mkdir -p "$OUT"

"${EVAL[@]}" --diagram --out "$OUT/fig3_framework.png"
"${EVAL[@]}" --plot "${RUNS[@]}" --checkpoint training_k --out "$OUT/fig1_metric_vs_k.png"   # as the demo table
{
    echo "## Router entropy (Tables 4 / A5)"
    "${EVAL[@]}" --entropy "${RUNS[@]}" --max_eval_steps "${MAX_EVAL_STEPS:-100}" --out "$OUT/router_entropy.png"
    echo
    echo "## Expert load"
    "${EVAL[@]}" --load "${RUNS[@]}" --max_eval_steps "${MAX_EVAL_STEPS:-100}" --out "$OUT/expert_load.png"
    echo
    echo "## Routers' softmax at test token(s) ${TOKENS:-100} (Figure 4)"
    "${EVAL[@]}" --routers "${RUNS[@]}" --tokens "${TOKENS:-100}" --out "$OUT/fig4_router_outputs.png"
    echo
    echo "## Router term of dL/dh over training (Section 3.3)"
    "${EVAL[@]}" --jacobian "${RUNS[@]}" --max_tokens "${MAX_TOKENS:-2048}" --out "$OUT/jacobian_spectra.png"
    echo
    echo "## Inference FLOPs of these models (Table A3)"
    "${EVAL[@]}" --flops "${RUNS[@]}"
    echo
    echo "## Parameters of these models (Table A4)"
    "${EVAL[@]}" --params "${RUNS[@]}"
    if [ "${PAPER:-0}" = 1 ]; then
        echo
        echo "## Inference FLOPs of the paper's small enwik8 model (Table A3)"
        "${EVAL[@]}" --flops
        echo
        echo "## Parameters of the paper's small enwik8 model (Table A4)"
        "${EVAL[@]}" --params
    fi
} | tee "$OUT/tables.txt"
echo "figures and tables in $OUT/"
