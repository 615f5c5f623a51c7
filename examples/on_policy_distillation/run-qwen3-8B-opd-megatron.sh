#!/usr/bin/env bash
# On-policy distillation of Qwen3-8B from Qwen3-32B loaded inside the Megatron trainer (--opd-type megatron).
# The teacher is its own Megatron model (it may differ from the student in size); its weights move to CPU
# between uses (--offload-teacher). One node with 8 GPUs: trainer on 4 GPUs (TP=4), 4 SGLang engines of 1 GPU.
# Usage: bash examples/on_policy_distillation/run-qwen3-8B-opd-megatron.sh
source "$(dirname "$0")/common.sh"

fetch Qwen/Qwen3-32B "$TEACHER"
fetch Qwen/Qwen3-8B "$STUDENT"
fetch zhuzilin/dapo-math-17k "$(dirname "$DATA")" --repo-type dataset

# 1. Convert the teacher to Megatron torch_dist (once; the HF config and tokenizer are stored inside).
TEACHER_DIST=${TEACHER_DIST:-$MODELS/Qwen3-32B_torch_dist}
if [ ! -f "$TEACHER_DIST/latest_checkpointed_iteration.txt" ]; then
  CUDA_VISIBLE_DEVICES=0 python3 "$REPO/tools/convert_hf_to_torch_dist.py" --hf-checkpoint "$TEACHER" \
    --save "$TEACHER_DIST" --dtype bf16
fi

# 2. Train (the student is read from its HF directory; no conversion needed).
"$OPD_TRAIN" "${COMMON_ARGS[@]}" \
  --use-opd --opd-type megatron --opd-teacher-load "$TEACHER_DIST" --offload-teacher \
  --actor-num-nodes 1 --actor-num-gpus-per-node 4 --tensor-model-parallel-size 4 \
  --rollout-num-engines 4 --rollout-num-gpus-per-engine 1 --sglang-extra-args "--mem-fraction-static 0.7" \
  "$@"
