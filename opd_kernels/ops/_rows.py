"""Mapping ``[..., V]`` inputs of any strides onto the 2-D ``[R, V]`` row view the row kernels read.

The kernels take one row stride (``x[r, v]`` at ``r * row_stride + v``). Most inputs collapse to that without a
copy: contiguous ``[B, S, V]``, Megatron's ``[S, B, V]``, a transposed ``[B, S, V]``, a broadcast row
(row stride 0). The standard LM shift ``logits[:, :-1, :]`` of a contiguous ``[B, S, V]`` does not: its rows
sit at ``b * S + s`` for ``s < S - 1``, i.e. every row of the 2-D view ``[B * S - 1, V]`` except one per
sequence. We run the kernels over that *superset* view (the gap rows get the ignore token, so they cost one
row read each and write zero gradient) and gather the per-row results back: no copy of the logits, and the
gradient is a strided view of the kernel's ``[R, V]`` output with exactly the input's strides.

The rule (:func:`plan_rows`): drop size-1 dims; if every remaining row dim has stride 0, read one row with row
stride 0; otherwise, when all row strides are positive multiples of the smallest one and each dim's stride
steps past the whole reach of the dims with smaller strides (so distinct indices are distinct rows), the
superset has ``R = 1 + sum (size - 1) * stride / unit`` rows; it is used when ``R <= 2 N``. Anything else (a
vocabulary stride != 1, overlapping rows, a sparse superset) is copied to a contiguous ``[N, V]`` first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowPlan:
    batch_shape: tuple[int, ...]
    vocab: int
    rows: int                                 # R: rows the kernels see (>= N; the extra ones are gaps)
    row_stride: int                           # elements between consecutive kernel rows in the input storage
    index_strides: tuple[int, ...] | None     # kernel-row step per batch dim; None: row-major batch order
    copy: bool                                # the input is copied to a contiguous [N, V] first

    @property
    def numel(self) -> int:
        return math.prod(self.batch_shape)


def _row_major(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def plan_rows(x: torch.Tensor) -> RowPlan:
    """How ``x`` ``[..., V]`` becomes the kernels' ``[R, V]`` view (metadata only: no data is touched)."""
    batch, vocab = tuple(x.shape[:-1]), x.shape[-1]
    n = math.prod(batch)
    copy = RowPlan(batch, vocab, n, vocab, None, True)
    if vocab > 1 and x.stride(-1) != 1:
        return copy
    dims = [(size, stride) for size, stride in zip(batch, x.stride()[:-1]) if size != 1]
    if n == 0 or not dims:
        return RowPlan(batch, vocab, n, vocab, None, False)
    if all(stride == 0 for _, stride in dims):
        return RowPlan(batch, vocab, n, 0, None, False)  # one broadcast row, read n times
    unit = min(stride for _, stride in dims)
    if unit == 0 or any(stride % unit for _, stride in dims):
        return copy
    reach = 0  # largest kernel-row index reachable with the dims seen so far (ascending stride)
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride // unit <= reach:
            return copy  # two batch indices would share a row
        reach += (size - 1) * (stride // unit)
    rows = reach + 1
    if rows > 2 * n:
        return copy
    index = tuple(stride // unit if size != 1 else 0 for size, stride in zip(batch, x.stride()[:-1]))
    if rows == n and all(i == r for i, r, size in zip(index, _row_major(batch), batch) if size != 1):
        index = None
    return RowPlan(batch, vocab, rows, unit, index, False)


def compatible(a: RowPlan, b: RowPlan) -> bool:
    """Two inputs can share one row index space (their row strides may differ)."""
    return a.rows == b.rows and a.index_strides == b.index_strides


def as_copy(plan: RowPlan) -> RowPlan:
    return RowPlan(plan.batch_shape, plan.vocab, plan.numel, plan.vocab, None, True)


def rows_view(x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """The ``[R, V]`` view of ``x`` (a contiguous copy when ``plan.copy``)."""
    if plan.copy:
        return x.contiguous().view(plan.rows, plan.vocab)
    return x.as_strided((plan.rows, plan.vocab), (plan.row_stride, 1))


def to_rows(t: torch.Tensor, plan: RowPlan, fill) -> torch.Tensor:
    """A per-position tensor ``[...]`` laid out over the kernel rows ``[R]`` (contiguous; gaps = ``fill``)."""
    if plan.index_strides is None:
        return t.reshape(plan.rows).contiguous()
    out = t.new_full((plan.rows,), fill)
    out.as_strided(plan.batch_shape, plan.index_strides).copy_(t)
    return out


def from_rows(t: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Per-row results ``[R]`` back to the batch shape ``[...]`` (contiguous)."""
    if plan.index_strides is None:
        return t.view(plan.batch_shape)
    return t.as_strided(plan.batch_shape, plan.index_strides).contiguous()


def grad_strides(plan: RowPlan) -> tuple[int, ...]:
    """Strides of the gradient ``[..., V]`` that :func:`grad_from_rows` returns."""
    if plan.index_strides is None:
        return _row_major(plan.batch_shape + (plan.vocab,))
    return tuple(i * plan.vocab for i in plan.index_strides) + (1,)


def grad_from_rows(grad: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """The kernels' contiguous ``[R, V]`` gradient as a ``[..., V]`` tensor (a view: gap rows stay unused)."""
    return grad.as_strided(plan.batch_shape + (plan.vocab,), grad_strides(plan))


def empty_grad(like: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """What :func:`grad_from_rows` returns, without data (for fake implementations and empty inputs)."""
    return torch.empty_strided(plan.batch_shape + (plan.vocab,), grad_strides(plan), dtype=like.dtype,
                               device=like.device)
