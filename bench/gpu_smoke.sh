#!/usr/bin/env bash
# GPU smoke test of the whole pipeline, for a machine with one GPU or more and the project's venv; under 8 minutes.
#
#     bench/gpu_smoke.sh                        # GPU: the random-initialized Qwen2.5-VL-3B-shaped model
#     SMOKE_MODEL=tiny bench/gpu_smoke.sh       # the same commands at tiny size, on CPU too (checks the script)
#
# Checks, each printing one line `gpu_smoke <check>: ok|FAIL|skipped s=<seconds> <details>`:
#   env           torch sees the GPU(s); vLLM, Ray and DeepSpeed import
#   learner       bench/learner_step.py: the learner's update on full-size boards, no vLLM (its summary line)
#   vllm          vLLM on CUDA: bench/rollout.py's rounds of the real rollout actor (its summary line)
#   nccl          the NCCL weight transfer, inside train_sync: with two GPUs or more the learner and the engine have
#                 their own and weight_sync.backend=auto picks NCCL. With one GPU it is skipped: NCCL refuses two
#                 ranks on one device ("Duplicate GPU detected"), so the one-GPU runs below broadcast over gloo.
#   train_sync    three training steps of launch/train.py in sync mode (rounds, broadcast between them)
#   train_async   three steps in async mode (streaming actors, in-flight weight updates)
#   logprob_parity  bench/logprob_parity.py (learner vs sampler log-probs; its summary line)
# and last `gpu_smoke: passed=<n> failed=<n> skipped=<n> s=<seconds>`; the exit status is 1 if a check failed.
# Logs go to $SMOKE_OUT (default runs/gpu-smoke). With one GPU, a private Ray cluster advertises two so that a
# learner and an engine can both be placed; neither process is then restricted to its "own" GPU (both use GPU 0),
# and the engine takes SMOKE_GPU_MEM of it (the learner, ZeRO-3 with Adam on 3B parameters, needs the rest).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
MODEL=${SMOKE_MODEL:-qwen2_5_vl_3b_random}
OUT=${SMOKE_OUT:-runs/gpu-smoke}
GPU_MEM=${SMOKE_GPU_MEM:-0.3}
LIMIT_S=${SMOKE_LIMIT_S:-200}  # per check: a hung engine or a group that never forms fails its check, not the script
mkdir -p "$OUT"
started=$(date +%s)
passed=0 failed=0 skipped=0

report() {  # report <check> <ok|FAIL|skipped> <seconds> <details>
    echo "gpu_smoke $1: $2 s=$3 $4"
    case $2 in ok) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
}

run_check() {  # run_check <check> <summary-line prefix or ""> <command...>: the command's last matching line
    local name=$1 prefix=$2 t0 rc line
    shift 2
    t0=$(date +%s)
    timeout "$LIMIT_S" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    line=$(grep -a "^${prefix}" "$OUT/$name.log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        report "$name" ok $(($(date +%s) - t0)) "${line}"
    else
        report "$name" FAIL $(($(date +%s) - t0)) "rc=$rc log=$OUT/$name.log $(tail -n 1 "$OUT/$name.log")"
    fi
    return "$rc"
}

# ---- env
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
env_check='import vllm, ray, deepspeed, torch; print("env:", "vllm", vllm.__version__, "ray", ray.__version__,
    "deepspeed", deepspeed.__version__, "torch", torch.__version__, "gpus", torch.cuda.device_count())'
run_check env "env:" "$PY" -c "$env_check"
if [ "$MODEL" != tiny ] && [ "$GPUS" -lt 1 ]; then
    report env FAIL 0 "no GPU visible to torch (SMOKE_MODEL=tiny runs the commands on CPU)"
fi

# ---- the learner alone (no vLLM): GRPO updates of the model, DeepSpeed ZeRO-3 in bf16, on full-size boards
run_check learner "learner_step:" "$PY" -P bench/learner_step.py --model "$MODEL" --micro-batch-tokens 8192 --updates 2

# ---- vLLM on CUDA: the rollout actor's rounds beside plain vLLM on the same prompts
run_check vllm "rollout:" "$PY" -P bench/rollout.py --model "$MODEL" --states 8 --in-flight 4 --group-size 2 \
    --max-new-tokens 32 --reps 2

# ---- training: three steps in each mode
TRAIN=(game=tetris "model=$MODEL" trainer.total_steps=3 trainer.groups_per_step=4 actors.states_per_round=4
    actors.group_size=4 actors.max_new_tokens=32 actors.enforce_eager=true trainer.image_every=0
    checkpoint.every_steps=100)
ray_group=""
if [ "$GPUS" -eq 1 ]; then
    # One GPU: a learner and an engine share it (see the header); the broadcast goes over gloo. The cluster's daemons
    # stay in the process group of its `ray start`, which is all that is stopped at the end (never `ray stop`).
    export RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1
    setsid "$(dirname "$PY")/ray" start --head --temp-dir "$(mktemp -d /tmp/smoke-ray.XXXX)" --num-gpus 2 \
        --disable-usage-stats --include-dashboard false >"$OUT/ray_start.log" 2>&1 &
    ray_group=$!
    wait "$ray_group" || report ray_start FAIL 0 "log=$OUT/ray_start.log"
    export RAY_ADDRESS=auto
    TRAIN+=(weight_sync.backend=gloo "actors.gpu_memory_utilization=$GPU_MEM")
elif [ "$GPUS" -ge 2 ]; then
    TRAIN+=(weight_sync.backend=nccl)  # a GPU each for the learner and the engine
fi
for mode in sync async; do
    staleness=$([ "$mode" = async ] && echo 2 || echo 0)
    run_check "train_$mode" "done:" "$PY" launch/train.py "${TRAIN[@]}" "trainer.mode=$mode" \
        "buffer.max_staleness=$staleness" "output_dir=$OUT/train-$mode"
    rc=$?
    if [ "$mode" = sync ] && [ "$GPUS" -ge 2 ]; then
        report nccl "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" 0 "weight_sync.backend=nccl in train_sync"
    elif [ "$mode" = sync ]; then
        report nccl skipped 0 "gpus=$GPUS: NCCL needs a GPU per rank (one-GPU runs broadcast over gloo)"
    fi
    rm -rf "$OUT/train-$mode/checkpoints"  # a 3B checkpoint with its optimizer state is ~40 GB
done
if [ -n "$ray_group" ]; then
    kill -- "-$ray_group" 2>/dev/null
    unset RAY_ADDRESS RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
fi

# ---- log-prob parity: learner vs sampler on the same responses
run_check logprob_parity "logprob_parity:" "$PY" -P bench/logprob_parity.py --states 2 --group-size 2 \
    --max-new-tokens 16

echo "gpu_smoke: passed=$passed failed=$failed skipped=$skipped s=$(($(date +%s) - started))"
[ "$failed" -eq 0 ]
