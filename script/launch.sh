# Sourced by the training scripts: work from the repository root, on N_GPU GPUs when asked.
#   N_GPU=4 bash script/table1/hyper_router_enwik8.sh   -> torchrun with 4 processes (DDP)
#   PYTHON=/path/to/python                              -> another interpreter
# The GPU is used when torch sees one (--cuda is added); otherwise the run is on the CPU.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
N_GPU=${N_GPU:-1}

launch() {
    local device=()
    if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        device=(--cuda)
    fi
    if [ "$N_GPU" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$N_GPU" "$@" "${device[@]}"
    else
        "$PYTHON" -u "$@" "${device[@]}"
    fi
}
