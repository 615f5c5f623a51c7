"""Session-wide test setup (loaded before any test module is collected).

Triton's interpreter must be chosen before ``triton`` itself is imported (its standard-library helpers are
``@triton.jit`` functions created at import time), and several test packages import triton indirectly (megatron-core
does). So on machines without CUDA the interpreter is switched on here, first: the Triton row kernels then run
on CPU tensors (tests/ops). An explicit TRITON_INTERPRET in the environment is respected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
