"""Shared pieces of the in-place backward (``inplace_backward=True`` and the no-autograd ``*_grad_`` functions).

The technique (Liger's cross-entropy, flash-attention's ``inplace_backward``): when the caller owns the logits and
will not read them again, the forward writes d(value)/d(logits) for a unit upstream gradient into the logits
buffer itself during its one pass over each row, and the backward only scales every row by its upstream gradient
in place. Forward + backward then read the logits once, write them once more and allocate nothing of size
[N, V]; the recompute backward (the default) reads them twice and allocates the [N, V] gradient, which on a fresh
allocation also costs the page faults of that gradient.

The buffer must be the caller's: a ``[..., V]`` tensor whose rows sit at one uniform stride >= V with column
stride 1 (any contiguous tensor; not a broadcast, an overlapping view, a vocabulary-strided view, or the LM shift
``logits[:, :-1]`` of a batch of several sequences, whose rows skip one row per sequence: pass the whole
``logits`` with ``ignore_index`` on the last position instead). It is overwritten by the forward. Its version
counter is recorded, and a backward that finds it changed since the forward raises.
"""
from __future__ import annotations

import importlib

import torch

from .. import _backend
from . import _checks, _rows

# Elements per row block of the combined (log-prob + KL) gradient: one temporary of this size (64 MiB fp32, the
# fused linear op's default chunk). Small blocks are slow: each block's fresh temporary is page-faulted anew
# (341 x 49152 fp32 rows, 2 cores: 254 ms in 4 MiB blocks, 183 ms in 16 MiB, 78 ms in one 64 MiB block).
_BLOCK_ELEMENTS = 1 << 24


def kernel(name: str, device_type: str):
    """The in-place row kernel ``name`` of the backend that runs on ``device_type`` now."""
    backend = _backend.resolve(device_type)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.opd_C, name)
    module = "opd_kernels._torch_rows" if backend == "torch" else "opd_kernels.triton"
    return getattr(importlib.import_module(module), name)


def buffer_plan(x: torch.Tensor, name: str) -> _rows.RowPlan:
    """The row plan of a buffer the in-place kernels may overwrite; ValueError when ``x`` is not one."""
    plan = _rows.plan_rows(x)
    if plan.rows == 0:
        return plan
    why = None
    if plan.copy:
        why = "its rows cannot be read as one strided [N, V] view without a copy (vocabulary stride != 1, " \
              "overlapping or irregular rows)"
    elif plan.index_strides is not None or plan.rows != plan.numel:
        why = "its rows are not in row-major order at one stride (e.g. a transposed [S, B, V] view, or the LM " \
              "shift logits[:, :-1] of several sequences: pass the whole logits with ignore_index on the last " \
              "position)"
    elif plan.rows > 1 and plan.row_stride < plan.vocab:
        why = f"its rows overlap (row stride {plan.row_stride} < V = {plan.vocab}; e.g. an expanded tensor)"
    if why is not None:
        raise ValueError(f"inplace_backward: {name} (shape {tuple(x.shape)}, strides {x.stride()}) cannot hold its "
                         f"own gradient: {why}. Pass a contiguous buffer you own, or use inplace_backward=False")
    return plan


def record(ctx, buffer: torch.Tensor) -> None:
    """Keep the overwritten buffer for the backward, with its version (not under torch.compile, whose functional
    graph owns the buffer and which cannot read a version counter)."""
    ctx.buffer = buffer
    ctx.version = None if torch.compiler.is_compiling() else buffer._version


@torch.library.custom_op("opd_kernels::scale_rows_", mutates_args=("buffer",))
def scale_rows_op(buffer: torch.Tensor, grad: torch.Tensor) -> None:
    """buffer [..., V] *= grad [...] per row (fp32 product, one rounding to the buffer's dtype)."""
    plan = buffer_plan(buffer, "logits")
    if plan.rows == 0:
        return
    if buffer.device.type == "cpu" and buffer.dtype != torch.float32 and _backend.available("cpp", "cpu"):
        # torch's CPU mul_ of a 16-bit tensor by an fp32 one is a slow mixed-dtype loop (~20x a copy)
        torch.ops.opd_C.scale_rows_(_rows.rows_view(buffer, plan), _rows.to_rows(grad.float(), plan, 0.0))
    else:
        buffer.mul_(grad.unsqueeze(-1).to(torch.float32))


@scale_rows_op.register_fake
def _scale_rows_fake(buffer, grad):
    return None


def scale_rows_(ctx, name: str, grad: torch.Tensor) -> torch.Tensor:
    """The backward: the buffer (holding the unit-upstream gradient) scaled in place by ``grad`` [...] per row."""
    buffer = ctx.buffer
    if ctx.version is not None and buffer._version != ctx.version:
        raise RuntimeError(f"inplace_backward: {name} was modified after the forward wrote its gradient into it "
                           f"(version {ctx.version} -> {buffer._version}); with inplace_backward=True the logits "
                           "buffer belongs to the op until its backward has run")
    scale_rows_op(buffer, grad)
    return buffer


def per_row64(t, logits: torch.Tensor, name: str) -> torch.Tensor:
    """A per-position float64 input (lse, kl): float64 keeps the backward exact (ops/README.md)."""
    _checks.float_values(t, logits, name)
    return t.detach().double().contiguous()


def row_blocks(rows: int, vocab: int):
    step = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
