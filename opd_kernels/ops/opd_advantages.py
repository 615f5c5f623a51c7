"""OPD advantage shaping in one read of the student logits: A' = A - coef * kl_t.

SKELETON: the public function runs the PyTorch reference until the kernels land (issue 2).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .reverse_kl import reverse_kl_reference
from .token_logprobs import token_logprobs_reference

KL_KINDS = ("k1", "k2", "k3", "full")


class OPDAdvantages(NamedTuple):
    advantages: torch.Tensor        # [...] fp32: A - coef * kl (unchanged where mask == 0)
    kl: torch.Tensor                # [...] fp32: the per-token KL term (0 where mask == 0)
    student_logprobs: torch.Tensor  # [...] fp32: log p_S(token) at temperature T (0 where mask == 0)


def kl_from_logprob_diff(d: torch.Tensor, kind: str) -> torch.Tensor:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d, with d = logp_student - logp_teacher."""
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown sampled KL estimator {kind!r}; choose one of k1, k2, k3 (or 'full')")


def opd_advantages_reference(student_logits, tokens, advantages, *, teacher_logprobs=None, teacher_logits=None,
                             coef=1.0, temperature=1.0, kl="k1", mask=None) -> OPDAdvantages:
    valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    safe_tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    logp = token_logprobs_reference(student_logits, safe_tokens, temperature=temperature)
    if kl == "full":
        term = reverse_kl_reference(student_logits, teacher_logits, temperature=temperature)
    else:
        term = kl_from_logprob_diff(logp - teacher_logprobs.to(logp.dtype), kl)
    zero = torch.zeros_like(term)
    term = torch.where(valid, term, zero)
    logp = torch.where(valid, logp, zero)
    return OPDAdvantages(advantages.to(term.dtype) - coef * term, term, logp)


@torch.no_grad()
def opd_advantages(student_logits, tokens, advantages, *, teacher_logprobs=None, teacher_logits=None, coef=1.0,
                   temperature=1.0, kl="k1", mask=None, process_group=None) -> OPDAdvantages:
    if process_group is not None:
        raise NotImplementedError("tensor-parallel opd_advantages lands with the kernels (issue 2)")
    out = opd_advantages_reference(student_logits, tokens, advantages, teacher_logprobs=teacher_logprobs,
                                   teacher_logits=teacher_logits, coef=coef, temperature=temperature, kl=kl,
                                   mask=mask)
    return OPDAdvantages(*(t.float() for t in out))
