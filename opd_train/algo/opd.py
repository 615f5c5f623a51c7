r"""On-policy distillation as an advantage penalty (SPEC §1).

For a response token a_t sampled from the student, with ``d_t = lp_S(t) - lp_T(t)`` (student minus teacher
log-prob of a_t given the same prefix), the sampled estimators of the reverse KL ``KL(p_S || p_T)`` at position t are

    k1 = d                       unbiased: E_{a~p_S}[d] = KL(p_S || p_T); can be negative per sample
    k2 = d^2 / 2                 >= 0, biased (its expectation is 1/2 E[d^2], a second-order match of KL)
    k3 = exp(-d) - 1 + d         >= 0, unbiased (E[exp(-d)] = E[p_T/p_S] = 1), lower variance near d = 0

and the OPD advantage is ``A'_t = A_t - coef * kl_t`` (:func:`apply_opd`), applied after the base estimator and
before whitening; it never touches the returns or the critic targets, and it is detached. With the task reward 0
for every sample, A = 0 and ``A' = -coef * kl``: pure distillation.

Why -k1 as an advantage distils: with the surrogate ``L = -sum_t sg(A'_t) log p_S(a_t)`` and a_t ~ p_S,
``E[grad L] = coef * E[d grad log p_S(a)] = coef * grad KL(p_S || p_T)`` (the score-function identity, using
``E[grad log p_S] = 0``), i.e. policy-gradient descent on the exact reverse KL; the tests check this numerically.

Where the teacher's whole distribution is known (teacher logits in the trainer, or a teacher top-k from SGLang),
the exact per-position KL can replace the sampled estimate: :func:`apply_opd_kl` takes it precomputed (e.g. from
``opd_kernels.reverse_kl``), and :func:`topk_reverse_kl` / :func:`topk_to_dense_logprobs` build it from a teacher
top-k. ``opd_kernels.opd_advantages`` is the fused kernel path for trainers that hold the student logits: it
computes the student log-prob, the KL term and A' in one pass and matches :func:`apply_opd`.
"""
from __future__ import annotations

import math

import torch

import opd_kernels

from ._checks import as_bool_mask, check_coef, check_finite_where, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")
# Floor on the teacher mass outside its top-k (a peaked teacher's top-k can sum to 1 in fp32): keeps the tail
# log-prob finite (about log(1e-12 / V)), so a student putting mass there pays a large but finite KL.
TOPK_TAIL_FLOOR = 1e-12


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


# ------------------------------------------------------------------------------------------- teacher top-k rows

def _check_topk(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, mask: torch.Tensor) -> None:
    """Raise on a malformed teacher top-k: shapes, dtypes, ids out of range or repeated, mass above 1."""
    if ids.shape != logprobs.shape or ids.dim() < 1:
        raise ValueError(f"teacher top-k ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be "
                         "[..., K]")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"teacher top-k ids must be an integer tensor; got {ids.dtype}")
    K = ids.shape[-1]
    if not 1 <= K <= vocab_size:
        raise ValueError(f"teacher top-k has K={K} entries per row; need 1 <= K <= vocab_size={vocab_size}")
    rows = mask.unsqueeze(-1).expand_as(ids)
    if bool((rows & ((ids < 0) | (ids >= vocab_size))).any()):
        raise ValueError(f"teacher top-k ids must lie in [0, {vocab_size}); check that the teacher and the student "
                         "share one vocabulary")
    check_finite_where("teacher top-k logprobs", logprobs, rows)
    ordered = ids.sort(-1).values
    if bool((mask & (ordered[..., 1:] == ordered[..., :-1]).any(-1)).any()):
        raise ValueError("teacher top-k ids repeat within a row; each row must list K distinct token ids")
    mass = torch.where(mask, torch.logsumexp(logprobs.double(), -1), torch.zeros((), dtype=torch.float64))
    if bool((mass > 1e-3).any()):
        raise ValueError("teacher top-k probabilities sum to more than 1 in some row; pass log-probs "
                         "(log_softmax of the teacher logits), not logits")


def _topk_tail_logprob(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[...] log-prob given to each of the V-K ids outside the top-k: the leftover mass spread uniformly."""
    K = logprobs.shape[-1]
    if K == vocab_size:
        return torch.zeros(logprobs.shape[:-1], dtype=logprobs.dtype, device=logprobs.device)
    leftover = -torch.expm1(torch.logsumexp(logprobs, -1))          # 1 - sum_k q_k, accurate near 0 and 1
    return leftover.clamp_min(TOPK_TAIL_FLOOR).log() - math.log(vocab_size - K)


def topk_to_dense_logprobs(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense teacher log-prob rows from a teacher top-k: the top-k values at their ids, the rest of the mass
    (``1 - sum_k q_k``, floored at 1e-12) spread uniformly over the other V-K ids.

    Args:
        topk_ids: [..., K] int64 teacher top-k token ids (e.g. ``align.response_topk_from_sglang``).
        topk_logprobs: [..., K] their teacher log-probs.
        vocab_size: V, the student's vocabulary size.

    Returns:
        [..., V] float32 log-prob rows that normalise (logsumexp = 0). Feed them as ``teacher_logits`` to
        ``opd_kernels.reverse_kl`` / ``opd_advantages(kl="full")`` at temperature 1 (log_softmax leaves normalised
        log-probs unchanged). This allocates [..., V]; :func:`topk_reverse_kl` gives the same KL without it.
    """
    mask = torch.ones(topk_ids.shape[:-1], dtype=torch.bool, device=topk_ids.device)
    _check_topk(topk_ids, topk_logprobs, vocab_size, mask)
    lq = topk_logprobs.float()
    tail = _topk_tail_logprob(lq, vocab_size)                                            # [...]
    dense = tail.unsqueeze(-1).expand(*tail.shape, vocab_size).clone()                  # [..., V]
    return dense.scatter_(-1, topk_ids.long(), lq)


def topk_reverse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``KL(p_S || q)`` per row against the top-k-completed teacher q of :func:`topk_to_dense_logprobs`,
    without materialising q. Differentiable w.r.t. ``student_logits`` (usable as a KL loss).

    With p = softmax(student_logits / T), H(p) its entropy, q_k the teacher top-k probabilities and c the tail
    log-prob: ``sum_v p log q = sum_k p_k (log q_k - c) + c`` (the p outside the top-k sum to ``1 - sum_k p_k``), so
    ``KL = -H(p) - sum_k p_k (log q_k - c) - c``. H and the log-sum-exp come from one fused
    ``opd_kernels.token_logprobs`` pass; the K student log-probs are ``logits[id]/T - logsumexp``.

    Args:
        student_logits: [..., V] student logits (any float dtype).
        topk_ids, topk_logprobs: [..., K] teacher top-k (log-probs used as given: SGLang scores prompts at T=1).
        temperature: the student's temperature T.
        mask: [...] rows to compute; other rows give 0 (their ids and values are ignored).

    Returns:
        [...] float32 KL per row.
    """
    V = student_logits.shape[-1]
    if student_logits.shape[:-1] != topk_ids.shape[:-1]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher top-k {tuple(topk_ids.shape)} "
                         "must share the leading dims [...]")
    valid = _mask_or_ones(mask, topk_ids[..., 0])
    _check_topk(topk_ids, topk_logprobs, V, valid)
    ids = torch.where(valid.unsqueeze(-1), topk_ids.long(), torch.zeros_like(topk_ids, dtype=torch.long))
    lq = torch.where(valid.unsqueeze(-1), topk_logprobs.float(), torch.full_like(topk_logprobs, -30.0).float())
    logp0, entropy = opd_kernels.token_logprobs(student_logits, ids[..., 0], temperature=temperature,
                                                return_entropy=True)                     # [...], [...]
    scaled = student_logits.gather(-1, ids).float() / temperature                       # [..., K]
    lse = scaled[..., 0] - logp0                                                         # [...]
    p_k = (scaled - lse.unsqueeze(-1)).exp()                                             # [..., K]
    c = _topk_tail_logprob(lq, V)                                                        # [...]
    kl = -entropy - (p_k * (lq - c.unsqueeze(-1))).sum(-1) - c
    return torch.where(valid, kl, torch.zeros_like(kl))
