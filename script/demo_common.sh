# The settings and the train function shared by script/demo.sh and script/demo_routers.sh (sourced by them).
#   WORK=runs/demo (output folder)  STEPS=500  DATA=data/synthetic  PYTHON=python
#   SEEDS="1111 1112 1113" (default: the one seed 1111, train.py's default)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
WORK=${WORK:-runs/demo}
STEPS=${STEPS:-500}
N_RUNS=$(seed_list | wc -l)
N_RUNS=$((N_RUNS > 0 ? N_RUNS : 1))
mkdir -p "$WORK"
COMMON=(--dataset synthetic --data "${DATA:-data/synthetic}"
        --n_layer 2 --d_model 64 --n_head 4 --d_head 16 --d_inner 64 --dropout 0.1
        --tgt_len 64 --mem_len 64 --eval_tgt_len 32 --batch_size 16
        --lr 0.002 --max_step "$STEPS" --eval-interval 250 --log-interval 100 --max_eval_steps 100
        --moe --moe-num-expert 16 --moe-top-k 2)
DYNAMIC_K=(--dynamic_moe --dynamic_moe_mode linear_increase --moe-top-k-min 8 --moe-top-k-max 16)

# train NAME [train.py flags]: one run per seed (the caller's EXTRA flags last), output in $WORK/NAME.log;
# prints their run directories
train() {
    local name=$1 start=$SECONDS
    shift
    echo "training $name ($STEPS steps, $N_RUNS run(s), log: $WORK/$name.log)" >&2
    launch train.py "${COMMON[@]}" --work_dir "$WORK/$name" "$@" "${EXTRA[@]}" > "$WORK/$name.log" 2>&1 \
        || { echo "$name failed, see $WORK/$name.log" >&2; exit 1; }
    echo "  done in $((SECONDS - start)) s" >&2
    ls -d "$WORK/$name-synthetic"/* | tail -n "$N_RUNS"
}
