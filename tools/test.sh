#!/usr/bin/env bash
# Sets everything up (tools/install.sh) and runs the test suite. This is what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. .venv/bin/activate
bash tools/check_cuda.sh  # compile-check csrc/cuda with nvcc (skipped with a reason when nvcc is absent)
python -m pytest -q -x --timeout=900 "$@"
