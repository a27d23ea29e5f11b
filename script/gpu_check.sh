#!/usr/bin/env bash
# GPU acceptance check: one command for the one GPU call (no network, nothing installed, at most 8 minutes on an
# H100). Every check runs whatever an earlier one did, each under its own time limit; the summary comes last,
# printed and written (gpu_check.md, gpu_check.json) even when checks fail. docs/speed.md says what each checks.
#
#   machine, timing, vs_cpu, resume   script/gpu_check.py: versions and engines; HyperRouter's training step at
#                                     k = 2 and over the script's k schedule in bf16 and TF32; loss and gradients
#                                     against the CPU's; a run stopped and resumed
#   train fp32, train amp             a STEPS-step run of script/table1/hyper_router_enwik8.sh on the built-in
#                                     corpus (its k schedule compressed into the run)
#   device tests                      pytest -m device --device cuda
#   bench fp32, bench amp             bench.py --device cuda [--amp]
#   fastmoe parity                    when `import fmoe` works
#
# Usage: bash script/gpu_check.sh
#   DEVICE=cuda (default) | cpu (the shortened CPU form: a tiny model, seconds) | sim (the dry run on
#   sim_device.py's simulated H100: the four script/gpu_check.py checks at full size, 1 timed step)
#   PYTHON=python3  OUT=. (gpu_check.md and gpu_check.json)  WORK=/tmp/gpu_check (logs, runs; emptied first)
#   STEPS=300  BUDGET=460 (seconds for all checks: a check never runs past what is left of it)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-.}
WORK=${WORK:-/tmp/gpu_check}
SCALE=1
[ "$DEVICE" = sim ] && SCALE=4 && BUDGET=${BUDGET:-1200}     # a CPU simulating the GPU: slower, longer limits
BUDGET=${BUDGET:-460}
export PYTHONUNBUFFERED=1
preflight=$("$PYTHON" - 2>&1 <<'EOF'
import sys
import torch
import torch_version
print(torch.__version__)
torch_version.check_torch(torch.__version__)          # below the oldest torch this code runs on: one error line
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
)
case $? in
    0) ;;
    3) if [ "$DEVICE" = cuda ]; then   # before anything else: without a GPU the full-size steps would crawl
           echo "error: DEVICE=cuda but torch $(head -1 <<< "$preflight") sees no CUDA device; run on a GPU machine, or give DEVICE=cpu for the shortened CPU form (DEVICE=sim: the simulated GPU)" >&2
           exit 2
       fi ;;
    *) echo "error: $PYTHON cannot run this code's torch ($(tail -1 <<< "$preflight")); give PYTHON=a python with torch >= 2.11" >&2
       exit 2 ;;
esac
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT" || exit 2
case $DEVICE in
    cpu) STEPS=${STEPS:-5}; HELPER=(--device cpu --quick)
         TRAIN=(--n_layer 2 --d_model 32 --n_head 2 --d_head 16 --d_inner 32 --tgt_len 16 --mem_len 16
                --eval_tgt_len 8 --batch_size 4 --moe-num-expert 4 --moe_index 0,1 --moe-top-k-min 1
                --moe-top-k-max 4 --max_eval_steps 2 --eval_ks 1,4) ;;
    sim) STEPS=${STEPS:-1}; HELPER=(--simulate --steps "$STEPS" --warmup 1) ;;
    *)   STEPS=${STEPS:-300}; HELPER=(--device cuda); TRAIN=(--max_eval_steps 50 --eval_ks 2,16) ;;
esac
export DEVICE                      # launch.sh: the training runs go on this device, or stop with an error
START=$SECONDS
status=()                          # "name|result|seconds|log" per check, for the summary

record() {                         # record NAME LIMIT COMMAND...: under min(LIMIT, what is left), to a log and the screen
    local name=$1 limit=$2 log="$WORK/${1// /_}.log" begin=$SECONDS left code
    shift 2
    left=$(( BUDGET - (SECONDS - START) ))
    (( limit > left )) && limit=$left
    echo "=== $name (at most ${limit}s): $*"
    if (( limit <= 0 )); then
        echo "no time left of BUDGET=$BUDGET s" > "$log"; status+=("$name|timeout|0|$log"); return
    fi
    timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1
    code=$?
    case $code in 0) code=ok ;; 124|137) code=timeout ;; *) code="exit $code" ;; esac
    status+=("$name|$code|$(( SECONDS - begin ))|$log")
}

declare -A LIMITS=([machine]=40 [timing]=150 [vs_cpu]=60 [resume]=90)    # seconds; on an H100 each needs under half
for check in machine timing vs_cpu resume; do
    record "$check" "$(( LIMITS[$check] * SCALE ))" "$PYTHON" script/gpu_check.py "$check" "${HELPER[@]}" --work "$WORK"
done
if [ "$DEVICE" != sim ]; then
    for precision in fp32 amp; do
        flags=()
        [ "$precision" = amp ] && flags=(--amp)
        [ "$precision" = amp ] && [ "$DEVICE" = cpu ] && continue        # --amp is bf16 autocast on the GPU only
        record "train $precision" 75 env DATA="$WORK/synthetic" PYTHON="$PYTHON" \
            bash script/table1/hyper_router_enwik8.sh --dataset synthetic --max_step "$STEPS" \
            --dynamic_overall_steps "$STEPS" --eval-interval "$STEPS" --log-interval "$(( STEPS > 50 ? 50 : 1 ))" \
            --work_dir "$WORK/train_$precision" "${TRAIN[@]}" "${flags[@]}"
    done
    record "device tests" 60 "$PYTHON" -m pytest -q -p no:cacheprovider -m device --device "$DEVICE"
    for precision in fp32 amp; do
        flags=()
        [ "$precision" = amp ] && flags=(--amp)
        [ "$DEVICE" = cpu ] && flags+=(--quick)
        record "bench $precision" 45 "$PYTHON" bench.py --device "$DEVICE" "${flags[@]}" --json "$WORK/bench_$precision.json"
    done
    if "$PYTHON" -c 'import fmoe' 2>/dev/null; then
        record "fastmoe parity" 30 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_moe.py -k fastmoe
    else
        status+=("fastmoe parity|skipped|0|")
    fi
fi
echo
"$PYTHON" script/gpu_check_summary.py "$WORK" "$OUT" "$DEVICE" "$STEPS" "${status[@]}"
