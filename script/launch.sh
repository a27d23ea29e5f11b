# Sourced by the training scripts: work from the repository root, on N_GPU GPUs when asked.
#   N_GPU=4 bash script/table1/hyper_router_enwik8.sh   -> torchrun with 4 processes (DDP)
#   SEEDS="1111 1112 1113" bash script/...              -> one run per seed (--seed S after every other flag),
#                                                          all in the script's <work_dir>-<dataset>/ folder;
#                                                          without SEEDS: one run with the script's own seed
#   PYTHON=/path/to/python                              -> another interpreter
#   DEVICE=cuda | cpu | auto (default auto)              -> cuda: on the GPU, and an error at once when torch sees
#                                                          none; cpu: on the CPU; auto: on the GPU when torch
#                                                          sees one (--cuda is added), else on the CPU, but only
#                                                          for a run of at most CPU_AUTO_MAX_STEP steps: a longer
#                                                          one (a paper-size script) stops unless DEVICE=cpu
#   PRECISION=fp32 | bf16 (default fp32)                 -> fp32: the paper's (the original trained in fp32; on a
#                                                          GPU its matmuls take TF32, as the original's did on
#                                                          A100; --no_tf32 for full fp32); bf16: --amp, bf16
#                                                          autocast with the routers in fp32 (GPU only)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
N_GPU=${N_GPU:-1}

# seed_list: the seeds of $SEEDS, one a line (nothing when SEEDS is unset or empty); an error if one is not an integer
seed_list() {
    local seed
    for seed in ${SEEDS:-}; do
        if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
            echo "error: SEEDS must be non-negative integers separated by spaces, such as SEEDS=\"1111 1112 1113\"; got '$seed'" >&2
            return 2
        fi
        echo "$seed"
    done
}

# the most steps DEVICE=auto trains on the CPU without being told (DEVICE=cpu): the demo's 500 pass, the paper's
# 100k-400k stop; a script shortened with --max_step N up to this runs wherever it is
CPU_AUTO_MAX_STEP=10000

# max_step_of [train.py flags]: the --max_step the run gets (train.py takes a flag's last value), empty if none
max_step_of() {
    local value="" previous="" word
    for word in "$@"; do
        case "$previous" in --max_step | --max-step) value=$word ;; esac
        case "$word" in --max_step=* | --max-step=*) value=${word#*=} ;; esac
        previous=$word
    done
    echo "$value"
}

# device_flag [train.py flags]: --cuda when the run goes on the GPU (see DEVICE above), nothing for the CPU; an error
# for DEVICE=cuda without a GPU, and for DEVICE=auto without one when the run is longer than CPU_AUTO_MAX_STEP steps
# (a full-size run would otherwise train silently on the CPU, for weeks)
device_flag() {
    local steps
    case "${DEVICE:-auto}" in
        cpu) ;;
        auto) if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
                  echo --cuda
                  return
              fi
              steps=$(max_step_of "$@")
              if [[ "$steps" =~ ^[0-9]+$ ]] && [ "$steps" -gt "$CPU_AUTO_MAX_STEP" ]; then
                  echo "error: torch sees no CUDA device, and a run of $steps steps (--max_step) would train on the" \
                       "CPU for days; give DEVICE=cpu to train it there anyway, DEVICE=cuda on a GPU machine, or a" \
                       "shorter --max_step (at most $CPU_AUTO_MAX_STEP)" >&2
                  return 2
              fi ;;
        cuda) if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
                  echo "error: DEVICE=cuda but torch sees no CUDA device; run on a GPU machine, or give DEVICE=cpu" >&2
                  return 2
              fi
              echo --cuda ;;
        *) echo "error: DEVICE must be cuda, cpu or auto; got '$DEVICE'" >&2
           return 2 ;;
    esac
}

# precision_flag: --amp for PRECISION=bf16, nothing for fp32 (see PRECISION above)
precision_flag() {
    case "${PRECISION:-fp32}" in
        fp32) ;;
        bf16) echo --amp ;;
        *) echo "error: PRECISION must be fp32 or bf16; got '$PRECISION'" >&2
           return 2 ;;
    esac
}

# launch_once SCRIPT [flags]: one run, with torchrun when N_GPU > 1
launch_once() {
    local flag device=()
    flag=$(device_flag "$@") || return
    [ -n "$flag" ] && device=("$flag")
    flag=$(precision_flag) || return
    [ -n "$flag" ] && device+=("$flag")
    if [ "$N_GPU" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$N_GPU" "$@" "${device[@]}"
    else
        "$PYTHON" -u "$@" "${device[@]}"
    fi
}

# launch SCRIPT [flags]: one run, or one per seed of $SEEDS (the last --seed wins: train.py takes a flag's last value)
launch() {
    local seeds seed
    seeds=$(seed_list) || return
    if [ -z "$seeds" ]; then
        launch_once "$@"
        return
    fi
    for seed in $seeds; do
        launch_once "$@" --seed "$seed" || return
    done
}
