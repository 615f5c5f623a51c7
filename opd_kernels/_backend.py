"""Which row-kernel implementation runs, per device type.

Backends (the row-kernel contract is documented in ``opd_kernels/ops/README.md``):
``torch`` (plain PyTorch, row-chunked, always available), ``cpp`` (C++ CPU kernels in ``_C.so``), ``cuda`` (CUDA
kernels in ``_C.so`` when torch has CUDA), ``triton`` (``opd_kernels.triton``; on CPU tensors only under
``TRITON_INTERPRET=1``). ``auto`` picks, for CPU tensors: cpp > torch; for CUDA tensors: cuda > triton > torch.
A compiled backend counts as available only when the dispatcher really has its kernels (a library built
without CPU sources, or a CUDA build of torch with CPU-only kernels, falls through to the next one).

Override with the environment variable ``OPD_KERNELS_BACKEND=auto|torch|cpp|triton|cuda`` (read at every call,
so tests may set it), or the :func:`use_backend` context manager, which wins over the variable. Asking for a
backend that is not available raises a RuntimeError that says why it is unavailable.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from types import SimpleNamespace

import torch

from ._epilogue import compose_missing

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
# Every backend implements the four core row kernels; the fused OPD epilogues are optional (composed from the
# core kernels plus a few [N]-sized torch ops when a backend lacks them).
CORE_KERNELS = ("logprob_fwd", "logprob_bwd", "kl_fwd", "kl_bwd")
EPILOGUE_KERNELS = ("opd_sampled_fwd", "opd_full_fwd")
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


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"opd_C::{op}", dispatch_key)
    except RuntimeError:  # the schema itself is missing (an older library)
        return False


@functools.cache
def _compiled_available(dispatch_key: str) -> bool:
    name = "cpp" if dispatch_key == "CPU" else "cuda"
    if not _HAVE_LIB:
        return False
    if dispatch_key == "CUDA" and (torch.version.cuda is None or not torch.cuda.is_available()):
        _unavailable[name] = "torch has no CUDA device here"
        return False
    if dispatch_key == "CPU" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _unavailable[name] = f"the C++ CPU kernels need AVX2; this CPU reports " \
                             f"{torch.backends.cpu.get_cpu_capability()}"
        return False
    missing = [op for op in CORE_KERNELS if not _has_kernel(op, dispatch_key)]
    if missing:
        _unavailable[name] = f"opd_kernels._C has no {dispatch_key} kernels for {missing} (rebuild it with " \
                             "`pip install --no-build-isolation -e .`)"
        return False
    return True


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
        return device_type == "cpu" and _compiled_available("CPU")
    if backend == "cuda":
        return device_type == "cuda" and _compiled_available("CUDA")
    if backend == "triton":
        if not _triton_available():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")


def why_unavailable(backend: str, device_type: str) -> str:
    if backend == "triton" and device_type == "cpu" and _triton_available():
        return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 (set before opd_kernels.triton is imported)"
    if backend == "cpp" and device_type != "cpu":
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


@functools.cache
def _row_kernels(backend: str, device_type: str) -> SimpleNamespace:
    if backend in ("torch", "triton"):
        impl = importlib.import_module("opd_kernels._torch_rows" if backend == "torch" else "opd_kernels.triton")
        table = {name: getattr(impl, name) for name in CORE_KERNELS + EPILOGUE_KERNELS if hasattr(impl, name)}
    else:
        key = "CPU" if backend == "cpp" else "CUDA"
        names = CORE_KERNELS + tuple(n for n in EPILOGUE_KERNELS if _has_kernel(n, key))
        table = {name: getattr(torch.ops.opd_C, name) for name in names}
    return SimpleNamespace(name=backend, **compose_missing(table))


def kernels(device_type: str) -> SimpleNamespace:
    """The row kernels (``logprob_fwd``, ``logprob_bwd``, ``kl_fwd``, ``kl_bwd``, ``opd_sampled_fwd``,
    ``opd_full_fwd``) of the backend that runs on ``device_type`` now, plus its ``name``."""
    return _row_kernels(resolve(device_type), device_type)
