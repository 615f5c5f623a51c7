#!/usr/bin/env bash
# One GPU validation run (one H100/H200, under 8 minutes): builds the CUDA extension, runs every CUDA/Triton test
# (the kernels against the float64 oracle, the PTX exactness check, TP), the GPU benchmark sweep against the
# baselines and the measured bandwidth limit, the Megatron trainer's fused-OPD scenarios on the GPU, and a short
# `opd-train` smoke run where Ray is installed. Writes benchmarks/results/gpu-<date>/ (summary.txt, one log per
# step, the benchmark json/md/png); with $OUT set (the device tool) also $OUT/summary.txt and $OUT/gpu_check.tgz.
#   bash tools/gpu_wheels.sh   # here, with the registry: wheels the GPU image lacks, into .whl/ (carry it)
#   bash tools/gpu_check.sh    # on the GPU machine, in the repo root
# Every step runs under its own time limit and the script goes on after a failure; exit status 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results/gpu-$(date +%F)
mkdir -p "$RES"
: > "$RES/summary.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
failed=0

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $RES/NAME.log, one summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "[gpu_check] $name (limit ${limit}s) ..."
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc $((SECONDS - t0))s  $(grep -E 'passed|failed|error' "$RES/$name.log" | tail -1)"
  echo "$line" | tee -a "$RES/summary.txt"
  [ $rc -eq 0 ] || { failed=1; tail -20 "$RES/$name.log"; }
}

if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/opd-site .whl/*.whl \
    && export PYTHONPATH=/tmp/opd-site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$RES/device.txt"

step build 300 $PY -m pip install -q --no-build-isolation --no-deps -e .
step kernels 240 $PY -m pytest -q -p no:cacheprovider tests/ops
step bench 240 $PY -m benchmarks --device cuda --T 4096 32768 --V 32000 151936 --dtypes bf16 fp32 \
  --backends cuda triton naive chunked compile $($PY -c "import liger_kernel" 2>/dev/null && echo liger) \
  --out "$RES/bench" --note "tools/gpu_check.sh on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
if $PY -c "import megatron.core" 2> /dev/null; then
  step megatron 180 $PY -m pytest -q -p no:cacheprovider tests/backends/megatron/test_megatron_teacher.py
else
  echo "megatron: SKIPPED - megatron-core not importable (bash tools/gpu_wheels.sh here, carry .whl)" \
    | tee -a "$RES/summary.txt"
fi
if $PY -c "import ray, megatron.core, aiohttp, orjson, fastapi, uvicorn" 2> /dev/null; then
  step smoke 240 $PY -m opd_train.cli --output-dir /tmp/opd-gpu-smoke --experiment-fast --no-experiment-baseline
else
  echo "smoke: SKIPPED - opd-train needs ray, megatron-core, aiohttp, orjson, fastapi, uvicorn; missing:" \
    "$($PY -c "import importlib.util as u; print(*[m for m in ('ray','megatron','aiohttp','orjson','fastapi','uvicorn') if u.find_spec(m) is None])")" \
    | tee -a "$RES/summary.txt"
fi
if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files: the summary and one archive
  cp "$RES/summary.txt" "$OUT/" && tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
fi
echo "[gpu_check] results in $RES"; cat "$RES/summary.txt"
exit $failed
