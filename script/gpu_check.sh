#!/usr/bin/env bash
# GPU acceptance check: one command, no network, at most 8 minutes on one GPU; one table at the end.
# Without a GPU (DEVICE=cuda, the default) it stops at once with one error line.
#
#   0. script/gpu_check.py: the GPU, its capability, torch/CUDA versions, the attention backends and MoE engine
#      chosen; the paper's small model at k = 2, batch 22 x 512, memory 512, timed in TF32 and in bf16 with
#      torch.cuda.set_sync_debug_mode('error') on in the timed steps (targets on one H100: bf16 >= 400k, TF32 >=
#      150k tokens/s), beside bench.py's projection of that step; the GPU's loss and gradients against the CPU's
#      on the same weights and batch (tolerances in the helper); a run stopped and resumed on the GPU;
#   1. the device-aware tests on the GPU (pytest --device cuda -m device: MoE block vs brute force for
#      every engine and dtype, gates, HyperRouter cache, memory, determinism of eval, fused attention,
#      a GPU-trained checkpoint evaluated on the CPU);
#   2. bench.py --device cuda in fp32 (TF32 matmuls) and with --amp (bf16 autocast);
#   3. a 300-step run of script/table1/hyper_router_enwik8.sh on the built-in corpus, without and with
#      --amp: tokens/s, peak GPU memory, final validation bpc, and the projected wall time of the
#      script's 400k steps (its k schedule, 8 -> 16, compressed into the 300 steps, so the mean step
#      costs what the full run's does; training steps only, validation not counted);
#   4. the fastmoe parity tests when `import fmoe` works (reported as skipped otherwise).
#
# Usage: bash script/gpu_check.sh
#   DEVICE=cpu   the same on a CPU in shortened form (a tiny model, 5 steps, bench --quick, no --amp run)
#   OUT=runs/gpu_check (logs, bench JSON, run directories)  PYTHON=python  STEPS=300
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
if [ "$DEVICE" != cpu ]; then      # before anything else: without a GPU the full-size steps would crawl on the CPU
    "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || {
        echo "error: DEVICE=$DEVICE but torch sees no CUDA device (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)); run on a GPU machine, or give DEVICE=cpu for the shortened CPU form" >&2
        exit 2
    }
fi
export DEVICE                      # launch.sh: the training runs go on this device, or stop with an error
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then
    STEPS=${STEPS:-5}
    BENCH=(--quick)
    HELPER=(--quick)
    AMP_RUNS=(fp32)                  # train.py --amp is bf16 autocast on the GPU only
    TRAIN=(--n_layer 2 --d_model 32 --n_head 2 --d_head 16 --d_inner 32 --tgt_len 16 --mem_len 16
           --eval_tgt_len 8 --batch_size 4 --moe-num-expert 4 --moe_index 0,1 --moe-top-k-min 1 --moe-top-k-max 4
           --max_eval_steps 2 --eval_ks 1,4)
else
    STEPS=${STEPS:-300}
    BENCH=()
    HELPER=()
    AMP_RUNS=(fp32 amp)
    TRAIN=(--max_eval_steps 50 --eval_ks 2,16)
fi
status=()                            # one "name|exit status|log" per step, for the table

record() {                           # record NAME LOG COMMAND...: run it, its output to LOG and the screen
    local name=$1 log=$2
    shift 2
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$log"
    status+=("$name|${PIPESTATUS[0]}|$log")
}

record "gpu check" "$OUT/gpu_check.log" "$PYTHON" script/gpu_check.py --device "$DEVICE" "${HELPER[@]}" \
    --work "$OUT/helper" --json "$OUT/gpu_check.json"
record "device tests" "$OUT/tests.log" "$PYTHON" -m pytest -q -m device --device "$DEVICE"
for precision in fp32 amp; do
    flags=()
    [ "$precision" = amp ] && flags=(--amp)
    record "bench $precision" "$OUT/bench_$precision.log" \
        "$PYTHON" bench.py --device "$DEVICE" "${BENCH[@]}" "${flags[@]}" --json "$OUT/bench_$precision.json"
done
for precision in "${AMP_RUNS[@]}"; do
    flags=()
    [ "$precision" = amp ] && flags=(--amp)
    rm -rf "$OUT/train_$precision-synthetic"
    record "train $precision" "$OUT/train_$precision.log" env DATA="$OUT/synthetic" PYTHON="$PYTHON" \
        bash script/table1/hyper_router_enwik8.sh --dataset synthetic --max_step "$STEPS" \
        --dynamic_overall_steps "$STEPS" --eval-interval "$STEPS" --log-interval "$(( STEPS > 50 ? 50 : 1 ))" \
        --work_dir "$OUT/train_$precision" "${TRAIN[@]}" "${flags[@]}"
done
if "$PYTHON" -c 'import fmoe' 2>/dev/null; then
    record "fastmoe parity" "$OUT/fastmoe.log" "$PYTHON" -m pytest -q -rs tests/test_moe.py -k fastmoe
else
    status+=("fastmoe parity|skipped|")
fi

echo
"$PYTHON" - "$OUT" "$STEPS" "${status[@]}" <<'EOF'
"""The table: one row per step, with its figures."""
import glob
import json
import os
import sys

out, steps, rows = sys.argv[1], int(sys.argv[2]), [row.split('|') for row in sys.argv[3:]]
FULL_STEPS = 400_000                                   # script/table1/hyper_router_enwik8.sh --max_step


def bench_figures(path):
    with open(path) as f:
        res = json.load(f)
    return (f"block/floor {res['moe_block_vs_floor']:.2f}, HR k2/dense {res['train_hr_k2_vs_dense']:.2f}, "
            f"MFU {res['train_mfu']:.2f}, eval k1/k16 {res['eval_k1_vs_k16']:.2f} "
            f"(FLOPs {res['eval_k1_vs_k16_flops']:.2f})")


def train_figures(run_parent):
    [run_dir] = glob.glob(os.path.join(run_parent + '-synthetic', '*'))
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, 'config.json')) as f:
        args = json.load(f)['args']
    train = [r for r in records if r['split'] == 'train']
    timed = train[1:] or train                         # the first window holds the warm-up
    tokens_per_s = sum(r['tokens_per_s'] for r in timed) / len(timed)
    hours = FULL_STEPS * args['batch_size'] * args['tgt_len'] / tokens_per_s / 3600
    bpc = [r['bpc'] for r in records if r['split'] == 'valid' and r.get('experts') == 'top_k'][-1]
    memory = [r['peak_mem_gib'] for r in train if 'peak_mem_gib' in r]
    memory = f'{max(memory):.1f} GiB' if memory else '- (not on a GPU)'
    return (f"{tokens_per_s:,.0f} tokens/s, peak GPU memory {memory}, valid bpc {bpc:.3f}, "
            f"400k steps in {hours:.1f} h")


def helper_figures(path, bench_path):
    with open(path) as f:
        res = json.load(f)
    projected = ''
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            projected = f" (projected {json.load(f)['sim_h100_tokens_per_s_projected']:,.0f}, a model: bench.py (f))"
    return (f"bf16 {res['bf16_tokens_per_s']:,.0f} tokens/s{projected}, TF32 {res['tf32_tokens_per_s']:,.0f}; "
            f"vs CPU: TF32 loss {res['tf32_vs_cpu'][0]:.1e} grads {res['tf32_vs_cpu'][1]:.1e}, "
            f"bf16 loss {res['bf16_vs_cpu'][0]:.1e} grads {res['bf16_vs_cpu'][1]:.1e}; resume ok")


figures = {'gpu check': lambda: helper_figures(os.path.join(out, 'gpu_check.json'),
                                               os.path.join(out, 'bench_amp.json')),
           'bench fp32': lambda: bench_figures(os.path.join(out, 'bench_fp32.json')),
           'bench amp': lambda: bench_figures(os.path.join(out, 'bench_amp.json')),
           'train fp32': lambda: train_figures(os.path.join(out, 'train_fp32')),
           'train amp': lambda: train_figures(os.path.join(out, 'train_amp'))}
print(f'{"check":16} {"result":8} figures')
failed = False
for name, code, log in rows:
    result = 'skipped' if code == 'skipped' else ('ok' if code == '0' else 'FAILED')
    failed |= result == 'FAILED'
    detail = f'exit status {code}, see {log}' if result == 'FAILED' else ''
    if result == 'ok' and name in figures:
        detail = figures[name]()
    elif result == 'ok' and log:
        with open(log) as f:
            detail = [line.strip() for line in f if line.strip()][-1]    # pytest's summary line
    elif result == 'skipped':
        detail = '`import fmoe` fails here'
    print(f'{name:16} {result:8} {detail}')
if steps < 300:
    print(f'(shortened form: {steps} steps of a tiny model; the figures say nothing about speed)')
sys.exit(1 if failed else 0)
EOF
