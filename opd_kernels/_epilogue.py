"""The per-token OPD epilogue (KL estimator, mask, advantage update) shared by every backend.

A backend may fuse it into its row kernel (``opd_sampled_fwd`` / ``opd_full_fwd``, one launch per op); when it
does not, :func:`compose_missing` builds those two kernels from the core ``logprob_fwd`` / ``kl_fwd`` plus these
[N]-sized torch ops. The tensor-parallel path always uses these functions after its all-reduces.
"""
from __future__ import annotations

from typing import Callable

import torch

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
MASKED_TOKEN = -1  # token id given to mask == 0 rows when composing: no real id is negative


def kl_from_diff(d: torch.Tensor, kl_kind: int) -> torch.Tensor:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (expm1 keeps k3 accurate for small d)."""
    if kl_kind == 1:
        return d
    if kl_kind == 2:
        return 0.5 * d * d
    if kl_kind == 3:
        return torch.expm1(-d) + d
    raise ValueError(f"kl_kind must be 1 (k1), 2 (k2) or 3 (k3), got {kl_kind!r}")


def apply_advantage(advantages: torch.Tensor, kl: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor | None,
                    coef: float):
    """(A - coef * kl, kl, logp) with kl = logp = 0 where mask == 0 (those rows keep their advantage)."""
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        logp = torch.where(mask, logp, torch.zeros_like(logp))
    return advantages - coef * kl, kl, logp


def masked_tokens(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return tokens if mask is None else torch.where(mask, tokens, torch.full_like(tokens, MASKED_TOKEN))


def compose_missing(table: dict[str, Callable]) -> dict[str, Callable]:
    """Add ``opd_sampled_fwd`` / ``opd_full_fwd`` built from the core kernels when ``table`` lacks them."""
    out = dict(table)
    logprob_fwd, kl_fwd = table["logprob_fwd"], table["kl_fwd"]

    def opd_sampled_fwd(x, tokens, advantages, teacher_logp, mask, coef, inv_temperature, kl_kind):
        logp, _, _ = logprob_fwd(x, masked_tokens(tokens, mask), inv_temperature, 0, MASKED_TOKEN, False)
        return apply_advantage(advantages, kl_from_diff(logp - teacher_logp, kl_kind), logp, mask, coef)

    def opd_full_fwd(student, teacher, tokens, advantages, mask, coef, inv_temperature):
        kl, _, _, logp = kl_fwd(student, teacher, masked_tokens(tokens, mask), inv_temperature, 0, MASKED_TOKEN)
        return apply_advantage(advantages, kl.float(), logp, mask, coef)

    out.setdefault("opd_sampled_fwd", opd_sampled_fwd)
    out.setdefault("opd_full_fwd", opd_full_fwd)
    return out
