#!/usr/bin/env bash
# Compile-checks the CUDA sources on a machine without a GPU (CI runs it from tools/test.sh):
# csrc/cuda/*_kernels.cu with nvcc for sm_90, csrc/cuda/bindings.cpp with the host compiler (-fsyntax-only).
# Configures CMake with -DOPD_NVCC_SYNTAX_CHECK=ON in a temporary build dir and builds only the check targets.
# Skips (exit 0, with the reason) when nvcc is absent. Usage: bash tools/check_cuda.sh  (inside the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "check_cuda: SKIPPED - nvcc not found (install the CUDA toolkit, or put its bin/ on PATH)"
  exit 0
fi
PYTHON=${PYTHON:-python}
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
build=$(mktemp -d "${TMPDIR:-/tmp}/opd-cuda-check.XXXXXX")
trap 'rm -rf "$build"' EXIT
# FindCUDAToolkit locates the toolkit from nvcc on PATH or /usr/local/cuda.
cmake -S . -B "$build" "${generator[@]}" -DOPD_NVCC_SYNTAX_CHECK=ON -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; echo "check_cuda: CMake configure failed"; exit 1; }
cmake --build "$build" --target opd_cuda_check
echo "check_cuda: OK (csrc/cuda compiles for sm_90; bindings.cpp passes a syntax check)"
