"""Which kernel implementation runs, per device type.

Backends: ``torch`` (the PyTorch reference, always available), ``cpp`` (C++ CPU kernels in ``_C.so``),
``cuda`` (CUDA kernels in ``_C.so`` when torch has CUDA), ``triton`` (Triton kernels; on CPU tensors only under
``TRITON_INTERPRET=1``). ``auto`` picks, for CPU tensors: cpp > torch; for CUDA tensors: cuda > triton > torch.

Override with the environment variable ``OPD_KERNELS_BACKEND=auto|torch|cpp|triton|cuda`` (read at every call,
so tests may set it), or the :func:`use_backend` context manager, which wins over the variable. Asking for a
backend that is not available raises a RuntimeError that says why it is unavailable.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
_ENV = "OPD_KERNELS_BACKEND"
_local = threading.local()
_unavailable: dict[str, str] = {}


def _load_library() -> bool:
    try:
        from . import _C  # noqa: F401  (importing registers the opd_C ops)
    except ImportError as exc:
        _unavailable["cpp"] = f"the compiled library opd_kernels._C did not load ({exc}); build it with " \
                              "`pip install --no-build-isolation -e .` (tools/install.sh does)"
        _unavailable["cuda"] = _unavailable["cpp"]
        return False
    return True


_HAVE_LIB = _load_library()


def _cuda_compiled() -> bool:
    if not _HAVE_LIB:
        return False
    if torch.version.cuda is None or not torch.cuda.is_available():
        _unavailable["cuda"] = "torch has no CUDA device here"
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("opd_C::logprob_fwd", "CUDA")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        _unavailable["triton"] = "triton is not installed (pip install 'triton>=3.6')"
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` ('cpu' or 'cuda') on this machine."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu" and _HAVE_LIB
    if backend == "cuda":
        return device_type == "cuda" and _cuda_compiled()
    if backend == "triton":
        if not _triton_available():
            return False
        if device_type == "cpu" and not triton_interpret():
            _unavailable.setdefault("triton-cpu", "Triton runs on CPU tensors only with TRITON_INTERPRET=1")
            return False
        return True
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")


def why_unavailable(backend: str, device_type: str) -> str:
    if backend == "triton" and device_type == "cpu" and _triton_available():
        return "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    if backend in ("cpp",) and device_type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if backend == "cuda" and device_type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    return _unavailable.get(backend, f"{backend} is not available for {device_type} tensors")


def requested() -> str:
    name = getattr(_local, "backend", None) or os.environ.get(_ENV, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not a kernel backend; choose one of {BACKENDS}")
    return name


def resolve(device_type: str) -> str:
    """The backend that runs for tensors on ``device_type`` under the current setting."""
    name = requested()
    if name == "auto":
        order = ("cpp", "torch") if device_type == "cpu" else ("cuda", "triton", "torch")
        return next(b for b in order if available(b, device_type))
    if not available(name, device_type):
        raise RuntimeError(f"kernel backend {name!r} is unavailable for {device_type} tensors: "
                           f"{why_unavailable(name, device_type)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops with backend ``name`` (one of BACKENDS); for tests and benchmarks."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous
