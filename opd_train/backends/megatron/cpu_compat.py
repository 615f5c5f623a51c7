"""Run Megatron-core 0.19 on CPU (gloo) when CUDA is absent: a scoped compatibility layer.

Megatron-core assumes a CUDA device in a handful of places that the CPU path of our trainer reaches (model
build, forward/backward, DDP buffers, optimizer, grad clipping, torch_dist checkpoints). :func:`cpu_compat` is a
context manager that, ONLY when ``torch.cuda.is_available()`` is False, redirects those assumptions for the
duration of the ``with`` block and restores everything on exit. It is re-entrant (nested uses are no-ops) and
is entered by every public method of the trainer. Nothing installed is edited, and torch factory functions are
never replaced (patching them corrupted a transformers rotary buffer on this team's machine).

What it changes, precisely:

1. A :class:`torch.overrides.TorchFunctionMode` (``_CudaToCpuMode``), active only inside the block:
   - any ``device=`` keyword naming CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` or a bare int,
     which torch reads as a CUDA index) becomes ``"cpu"`` -- Megatron allocates buffers with
     ``device=torch.cuda.current_device()`` / ``device="cuda"`` (DDP grad buffers, RoPE ``inv_freq``,
     grad-norm scratch tensors, checkpoint metadata);
   - ``Tensor.to(<cuda device>)`` maps to CPU, ``Tensor.cuda()`` returns the tensor itself, ``pin_memory=True``
     becomes False and ``Tensor.pin_memory()`` is the identity (pinning needs a CUDA driver);
   - ``Tensor.type()`` called with no argument on a CPU tensor returns the CUDA type name (e.g.
     ``"torch.cuda.FloatTensor"``): Megatron's optimizers and ``clip_grad_by_total_norm_fp32`` dispatch on, or
     assert, those exact strings.
2. Attributes of ``torch.cuda`` replaced for the block and restored after it:
   ``current_device`` -> 0 (an index, which rule 1 maps to CPU), ``synchronize``/``empty_cache`` -> no-ops,
   ``current_stream``/``default_stream``/``Stream``/``stream``/``Event`` -> inert stand-ins (CPU work is
   synchronous, so stream ordering is already guaranteed), and the CUDA RNG entry points
   (``get_rng_state``/``set_rng_state``/``manual_seed``, also under ``torch.cuda.random``) -> the CPU default
   generator, because on CPU every random op (dropout) draws from that generator.
3. ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU default
   generator: Megatron's RNG tracker forks "the CUDA RNG" around tensor-parallel dropout; on CPU the generator
   that dropout actually uses is the CPU one, so the tracker keeps its meaning (per-TP-rank dropout streams).
   (The stock versions queue callbacks with ``torch.cuda._lazy_call`` that never run on CPU.)

Nothing here is entered when CUDA is available: the GPU path runs stock Megatron.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_state = threading.local()


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device (the only case :func:`cpu_compat` changes anything)."""
    return not torch.cuda.is_available()


def _names_cuda(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True   # torch reads a bare int as a CUDA device index
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor", torch.uint8: "torch.cuda.ByteTensor",
    torch.int8: "torch.cuda.CharTensor", torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rule 1 of the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            return name if name is not None and args[0].device.type == "cpu" else func(*args)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if i > 0 and _names_cuda(a) else a for i, a in enumerate(args))
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU execution is already in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stands in for torch.cuda.Event."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.manual_seed(seed)


def _torch_cuda_replacements() -> list[tuple[object, str, object]]:
    null_stream = _NullStream()
    cuda = torch.cuda
    return [
        (cuda, "current_device", lambda: 0),
        (cuda, "synchronize", lambda device=None: None),
        (cuda, "empty_cache", lambda: None),
        (cuda, "current_stream", lambda device=None: null_stream),
        (cuda, "default_stream", lambda device=None: null_stream),
        (cuda, "Stream", _NullStream),
        (cuda, "Event", _NullEvent),
        (cuda, "stream", lambda stream=None: contextlib.nullcontext()),
        (cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        (cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state)),
        (cuda, "manual_seed", _cpu_manual_seed),
        (cuda.random, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        (cuda.random, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state)),
        (cuda.random, "manual_seed", _cpu_manual_seed),
    ]


def _megatron_replacements() -> list[tuple[object, str, object]]:
    from megatron.core.tensor_parallel import random as mcore_random
    return [(mcore_random, "_get_cuda_rng_state", _cpu_rng_get),
            (mcore_random, "_set_cuda_rng_state", _cpu_rng_set)]


_lock = threading.Lock()
_refcount = 0


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Apply the CPU compatibility layer for the enclosed block when CUDA is absent (else do nothing).

    Re-entrant and thread-aware: the ``torch.cuda``/Megatron attribute replacements are process-wide and
    reference-counted (applied by the outermost entry, restored by the last exit); the TorchFunctionMode is
    per-thread (torch modes are thread-local) and pushed once per thread.
    """
    global _refcount
    if not cuda_absent():
        yield
        return
    with _lock:
        if _refcount == 0:
            replacements = _torch_cuda_replacements() + _megatron_replacements()
            _state_saved[:] = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
            for owner, name, value in replacements:
                setattr(owner, name, value)
        _refcount += 1
    push_mode = not getattr(_state, "mode_active", False)
    try:
        if push_mode:
            _state.mode_active = True
            with _CudaToCpuMode():
                yield
        else:
            yield
    finally:
        if push_mode:
            _state.mode_active = False
        with _lock:
            _refcount -= 1
            if _refcount == 0:
                for owner, name, value in reversed(_state_saved):
                    setattr(owner, name, value)
                _state_saved.clear()


_state_saved: list[tuple[object, str, object]] = []
