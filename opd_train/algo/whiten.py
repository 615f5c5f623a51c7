r"""Masked advantage whitening across data-parallel ranks (SPEC §1, ``--normalize-advantages``).

Over every masked-in token of every rank in the group (m = mask, A = advantages):

    N = sum m,   mu = sum(m A) / N,   var = (sum(m A^2) - N mu^2) / (N - 1)      (Bessel-corrected)
    A <- (A - mu) / sqrt(var + eps)                                               (shift_mean=True)
    A <- (A - mu) / sqrt(var + eps) + mu                                          (shift_mean=False: rescale only)

The three sums travel in ONE all-reduce of a float64 [3] tensor, so the result is identical to whitening the
concatenated global batch on one process (float64 keeps ``sum A^2 - N mu^2`` free of cancellation for any
realistic batch). Masked-out tokens come back as exactly 0.
"""
from __future__ import annotations

import torch

from ._checks import as_bool_mask, check_same_shape

WHITEN_EPS = 1e-8


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 [3] tensor ``(sum m x, sum m x^2, sum m)``: the sufficient statistics that get all-reduced."""
    m = as_bool_mask(mask, "mask")
    xm = torch.where(m, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    return torch.stack([xm.sum(), (xm * xm).sum(), m.sum().double()])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the masked-in entries (0 when there are none); differentiable, local to this process."""
    m = as_bool_mask(mask, "mask")
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / m.sum().clamp_min(1).to(x.dtype)


def whiten(advantages: torch.Tensor, mask: torch.Tensor, *, process_group=None, shift_mean: bool = True,
           eps: float = WHITEN_EPS) -> torch.Tensor:
    """Whiten ``advantages`` [B, T] over the masked-in tokens of every rank of ``process_group``.

    Args:
        advantages: [B, T] (any float dtype; the output keeps it).
        mask: [B, T] 1 = trainable token.
        process_group: a ``torch.distributed`` group (e.g. the data-parallel group, or
            ``torch.distributed.group.WORLD``) whose ranks are whitened together; None = this process only.
            Every rank of the group must call this (it is a collective).
        shift_mean: True centres on the global mean; False only rescales the deviations, keeping the mean.
        eps: added to the variance.

    Returns:
        [B, T] whitened advantages, exactly 0 where the mask is 0.

    Raises:
        ValueError: shape mismatch, non-binary mask, or no masked-in token across the whole group (raised on
            every rank alike, after the all-reduce).
    """
    check_same_shape("advantages", advantages, mask=mask)
    m = as_bool_mask(mask, "mask")
    stats = masked_moments(advantages, m)                                               # [3] float64
    if process_group is not None:
        import torch.distributed as dist
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    s1, s2, n = stats.unbind()
    if float(n) < 1:
        raise ValueError("whiten: no masked-in token in the batch (across the whole process group); nothing to "
                         "normalise")
    mean = s1 / n
    var = ((s2 - n * mean * mean) / (n - 1).clamp_min(1)).clamp_min(0)                 # Bessel; N = 1 gives 0
    rstd = torch.rsqrt(var + eps)
    out = (advantages.double() - mean) * rstd
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device)).to(advantages.dtype)
