#!/usr/bin/env bash
# On-policy distillation of Qwen3-8B (student) from Qwen3-32B served by an SGLang server (--opd-type sglang).
# One node with 8 GPUs: GPU 7 runs the teacher server; opd-train gets GPUs 0-6 (trainer: 2 GPUs with TP=2;
# rollout: 4 SGLang engines of 1 GPU). Usage: bash examples/on_policy_distillation/run-qwen3-8B-opd.sh
source "$(dirname "$0")/common.sh"

# 1. Models and data (skipped when present).
fetch Qwen/Qwen3-32B "$TEACHER"
fetch Qwen/Qwen3-8B "$STUDENT"
fetch zhuzilin/dapo-math-17k "$(dirname "$DATA")" --repo-type dataset

# 2. The teacher server (its own GPU), stopped when this script exits.
TEACHER_HOST=${TEACHER_HOST:-127.0.0.1}
TEACHER_PORT=${TEACHER_PORT:-13141}
mkdir -p "$RUN_DIR"
TEACHER_LOG="$RUN_DIR/teacher_sglang.log"
CUDA_VISIBLE_DEVICES=${TEACHER_GPU:-7} python3 -m sglang.launch_server --model-path "$TEACHER" \
  --host "$TEACHER_HOST" --port "$TEACHER_PORT" --tp 1 --chunked-prefill-size 4096 --mem-fraction-static 0.6 \
  > "$TEACHER_LOG" 2>&1 &
TEACHER_PID=$!
trap 'kill $TEACHER_PID 2>/dev/null || true' EXIT
echo "waiting for the teacher server (log: $TEACHER_LOG) ..."
wait_healthy "http://$TEACHER_HOST:$TEACHER_PORT" "$TEACHER_PID" "$TEACHER_LOG"

# 3. Train. opd-train checks the flags, the teacher URL and vocabulary before starting anything; it starts a
#    local Ray cluster on the visible GPUs (or joins one with --ray-address) and the student engines itself.
CUDA_VISIBLE_DEVICES=${TRAIN_GPUS:-0,1,2,3,4,5,6} "$OPD_TRAIN" "${COMMON_ARGS[@]}" \
  --use-opd --opd-type sglang \
  --custom-rm-path opd_train.rollout.on_policy_distillation.reward_func \
  --custom-reward-post-process-path opd_train.rollout.on_policy_distillation.post_process_rewards \
  --rm-url "http://$TEACHER_HOST:$TEACHER_PORT/generate" \
  --actor-num-nodes 1 --actor-num-gpus-per-node 2 --tensor-model-parallel-size 2 \
  --rollout-num-engines 4 --rollout-num-gpus-per-engine 1 --sglang-extra-args "--mem-fraction-static 0.7" \
  "$@"
