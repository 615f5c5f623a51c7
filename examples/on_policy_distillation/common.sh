#!/usr/bin/env bash
# Shared settings of the two GPU recipes (sourced, not run). Override any variable from the environment.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
MODELS=${MODELS:-/root}                                   # where the checkpoints and data live
STUDENT=${STUDENT:-$MODELS/Qwen3-8B}                      # the student after SFT (a HF directory)
TEACHER=${TEACHER:-$MODELS/Qwen3-32B}                     # the teacher (a HF directory)
DATA=${DATA:-$MODELS/dapo-math-17k/dapo-math-17k.jsonl}   # {"prompt": [chat messages], "label": "answer"}
EVAL_DATA=${EVAL_DATA:-$MODELS/math500/test.jsonl}        # optional held-out set ({"prompt", "label"})
RUN_DIR=${RUN_DIR:-$MODELS/Qwen3-8B_opd}                  # checkpoints, metrics, TensorBoard, curves.png
OPD_TRAIN=${OPD_TRAIN:-opd-train}                         # the console script of `pip install -e .[train]`

# Download what is missing (needs `pip install huggingface_hub`; skip this by providing the directories).
fetch() {  # fetch REPO_ID DIR [--repo-type dataset]
  local id=$1 dir=$2; shift 2
  [ -e "$dir" ] || hf download "$id" --local-dir "$dir" "$@"
}

# The training flags both recipes share (slime-compatible names; `opd-train --help` documents each one).
COMMON_ARGS=(
  --hf-checkpoint "$STUDENT"
  --prompt-data "$DATA" --input-key prompt --label-key label --apply-chat-template --rollout-shuffle
  --num-rollout 300 --rollout-batch-size 16 --n-samples-per-prompt 4 --global-batch-size 64
  --rollout-max-response-len 16384 --rollout-temperature 1
  --advantage-estimator grpo --opd-kl-coef 1.0
  --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98 --clip-grad 1.0
  --bf16 --max-tokens-per-gpu 16384
  --load "$RUN_DIR/checkpoints" --save "$RUN_DIR/checkpoints" --save-interval 20
  --output-dir "$RUN_DIR"
)
if [ -f "$EVAL_DATA" ]; then
  COMMON_ARGS+=(--eval-prompt-data "$EVAL_DATA" --eval-rm-type math --eval-interval 20
                --eval-max-response-len 16384 --eval-temperature 0)
fi

# Wait until an SGLang server answers /health_generate (it can generate), or fail with the tail of its log.
wait_healthy() {  # wait_healthy URL PID LOG [TIMEOUT_S]
  local url=$1 pid=$2 log=$3 timeout=${4:-1800} start=$SECONDS
  until curl -sf "$url/health_generate" > /dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "server $url exited; log:" >&2; tail -n 50 "$log" >&2; exit 1; fi
    if (( SECONDS - start > timeout )); then echo "server $url not healthy after ${timeout}s" >&2; exit 1; fi
    sleep 5
  done
}
