r"""On-policy distillation as an advantage penalty (SPEC §1), and what each sampled estimator optimises.

For a response token a_t sampled from the student p = p_S(. | s_t), with ``d_t = lp_S(t) - lp_T(t)`` (student minus
teacher log-prob of a_t given the same prefix; q = p_T), the sampled estimators are

    k1 = d                       E_p[k1] = KL(p || q)                          can be negative per sample
    k2 = d^2 / 2                 E_p[k2] = E_p[d^2] / 2 >= 0, a second-order match of KL(p || q)
    k3 = exp(-d) - 1 + d         E_p[k3] = KL(p || q) (E_p[exp(-d)] = 1)        >= 0, low variance near d = 0

and the OPD advantage is ``A'_t = A_t - coef * k_t`` (:func:`apply_opd`), applied after the base estimator and
before whitening; it never touches the returns or the critic targets, and it is detached. With the task reward 0
for every sample, A = 0 and ``A' = -coef * k``: pure distillation.

What a detached advantage optimises is not its expectation but its score-function gradient: with the surrogate
``L = -sum_t sg(A'_t) log p(a_t)`` and a_t ~ p, ``E[grad L] = coef * E_p[k(d) grad log p(a)]``. Using
``grad KL(p||q) = E_p[d grad log p]`` (E_p[grad log p] = 0) and ``grad KL(q||p) = -E_q[grad log p]``:

    k1:  E_p[d grad log p]                  = grad KL(p || q)                        the reverse KL (slime's)
    k2:  E_p[(d^2/2) grad log p]            = grad (E_p[d^2/2] - KL(p || q))          vanishes to 2nd order at q
    k3:  E_p[(exp(-d) - 1 + d) grad log p]  = grad KL(p || q) - grad KL(q || p)      reverse minus forward KL

so only k1 descends the reverse KL; k3, "unbiased" as a value, is a biased advantage (k3 is the right estimator of a
KL *loss* differentiated through ``d``, GRPO's use of it, not of an advantage). Each of the three identities is
checked exactly on a small categorical example in ``tests/algo/test_algo_opd.py``. The gradients treat the state
s_t as fixed: the token-level objective, not the sequence-level KL (slime's, and ours).

Where the teacher's distribution is known the KL is a loss term instead (exact: ``opd_kernels.reverse_kl``; a top-K:
``opd_kernels.topk_kl``); :func:`apply_opd_kl` applies a precomputed per-token KL to the advantage for those who
want it there. ``opd_kernels.opd_advantages`` is the fused kernel the trainer runs: the student log-prob, the KL
term and A' in one pass over the student logits; it matches :func:`apply_opd`.
"""
from __future__ import annotations

import torch

from ..types import KL_ESTIMATORS
from ._checks import as_bool_mask, check_coef, check_finite_where, check_same_shape


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Sampled estimate of KL(p || p_ref) from log-probs of tokens drawn from p; ``d = logprobs - ref_logprobs``.

    ``k1 = d``, ``k2 = d^2/2``, ``k3 = exp(-d) - 1 + d`` (computed as ``expm1(-d) + d`` to keep precision near 0).
    Differentiable in both arguments; shapes broadcast.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)} (for the exact "
                     "full-vocabulary KL use apply_opd_kl with opd_kernels.reverse_kl)")


def _mask_or_ones(response_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if response_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return as_bool_mask(response_mask)


def _out_dtype(advantages: torch.Tensor) -> torch.dtype:
    return torch.promote_types(advantages.dtype, torch.float32)


@torch.no_grad()
def apply_opd(advantages: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *,
              coef: float = 1.0, kl: str = "k1",
              response_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = A - coef * kl(student, teacher)`` per token, with a sampled KL estimator.

    Args:
        advantages: [B, T] output of the base estimator (``compute_advantages``), before whitening.
        student_logprobs: [B, T] log p_S(a_t) of the sampled tokens under the behaviour (old) policy, at the
            temperature the teacher was scored at.
        teacher_logprobs: [B, T] log p_T(a_t) of the same tokens given the same prefixes (e.g. from
            ``align.response_logprobs_from_sglang``, right-padded; padding may hold anything, even NaN).
        coef: the OPD coefficient lambda (``--opd-kl-coef``), finite and >= 0.
        kl: "k1" (default, the reference behaviour), "k2" or "k3" (module docstring).
        response_mask: [B, T] 1 = trainable token; None = all tokens.

    Returns:
        (advantages' , kl): both [B, T] detached, in float32 (float64 for float64 advantages). Masked-out tokens
        get kl = 0 and keep their advantage (as ``opd_kernels.opd_advantages`` does).

    Raises:
        ValueError: shape mismatch, unknown ``kl``, bad ``coef``, or a non-finite log-prob inside the mask.
    """
    coef = check_coef("coef", coef)
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl!r}; choose one of {', '.join(KL_ESTIMATORS)} (for the exact "
                         "full-vocabulary KL use apply_opd_kl with opd_kernels.reverse_kl)")
    check_same_shape("advantages", advantages, student_logprobs=student_logprobs,
                     teacher_logprobs=teacher_logprobs, response_mask=response_mask)
    mask = _mask_or_ones(response_mask, advantages)
    check_finite_where("student_logprobs", student_logprobs, mask)
    check_finite_where("teacher_logprobs", teacher_logprobs, mask)
    dtype = _out_dtype(advantages)
    term = kl_estimate(student_logprobs.to(dtype), teacher_logprobs.to(dtype), kl)           # [B, T]
    term = torch.where(mask, term, torch.zeros((), dtype=dtype, device=term.device))
    return advantages.to(dtype) - coef * term, term


@torch.no_grad()
def apply_opd_kl(advantages: torch.Tensor, kl_per_token: torch.Tensor, *, coef: float = 1.0,
                 response_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = A - coef * KL_t`` with a precomputed per-token KL (``--opd-kl-mode full``).

    ``kl_per_token`` [B, T] is typically the exact ``KL_t = sum_v p_S(v) (log p_S(v) - log p_T(v))`` from
    ``opd_kernels.reverse_kl(student_logits, teacher_logits)`` or :func:`topk_reverse_kl`. Same conventions as
    :func:`apply_opd`: detached outputs, masked-out tokens get kl = 0 and keep their advantage.
    """
    coef = check_coef("coef", coef)
    check_same_shape("advantages", advantages, kl_per_token=kl_per_token, response_mask=response_mask)
    mask = _mask_or_ones(response_mask, advantages)
    check_finite_where("kl_per_token", kl_per_token, mask)
    dtype = _out_dtype(advantages)
    term = torch.where(mask, kl_per_token.to(dtype), torch.zeros((), dtype=dtype, device=kl_per_token.device))
    return advantages.to(dtype) - coef * term, term
