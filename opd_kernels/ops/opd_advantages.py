"""OPD advantage shaping in one read of the student logits: A' = A - coef * kl_t.

Math, d = log p_S(token) - log p_T(token) with p = softmax(logits / T):
  kl="k1": d     kl="k2": d^2 / 2     kl="k3": exp(-d) - 1 + d     (sampled, from ``teacher_logprobs``)
  kl="full": sum_v p_S (log p_S - log p_T)                        (exact, from ``teacher_logits``)
  kl="topk": the KL over the teacher's top-K ids plus a tail bucket (``topk_kl.py``; from ``teacher_topk_*``)
  advantages' = advantages - coef * kl; where mask == 0: kl = 0, student_logprobs = 0, advantage unchanged.
Shapes: student_logits [..., V]; tokens, advantages, teacher_logprobs, mask [...]; teacher_topk_* [..., K]
-> three fp32 [...]. Forward only: the results are detached (the advantage is a constant of the policy-gradient
loss). Without tensor parallelism each call is ONE row-kernel launch: the epilogue (estimator, mask, advantage
update) is fused into ``opd_sampled_fwd`` / ``opd_full_fwd`` where the backend offers it (``_epilogue.py``
otherwise); the top-K form runs the log-prob row kernel and an O(K) per-row epilogue.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _backend, _epilogue
from . import _checks, _rows, _tp
from .reverse_kl import pair_plans, reverse_kl_reference, sharded_kl
from .token_logprobs import sharded_logprobs, token_logprobs_reference
from .topk_kl import topk_kl_reference, topk_rows, topk_terms

KL_KINDS = ("k1", "k2", "k3", "full", "topk")


class OPDAdvantages(NamedTuple):
    advantages: torch.Tensor        # [...] fp32: A - coef * kl (unchanged where mask == 0)
    kl: torch.Tensor                # [...] fp32: the per-token KL term (0 where mask == 0)
    student_logprobs: torch.Tensor  # [...] fp32: log p_S(token) at temperature T (0 where mask == 0)


def kl_from_logprob_diff(d: torch.Tensor, kind: str) -> torch.Tensor:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d, with d = logp_student - logp_teacher."""
    if kind not in _epilogue.KL_CODES:
        raise ValueError(f"unknown sampled KL estimator {kind!r}; choose one of k1, k2, k3 (or 'full')")
    return _epilogue.kl_from_diff(d, _epilogue.KL_CODES[kind])


def opd_advantages_reference(student_logits, tokens, advantages, *, teacher_logprobs=None, teacher_logits=None,
                             teacher_topk_ids=None, teacher_topk_logprobs=None, coef=1.0, temperature=1.0, kl="k1",
                             mask=None) -> OPDAdvantages:
    valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    safe_tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    logp = token_logprobs_reference(student_logits, safe_tokens, temperature=temperature)
    if kl == "full":
        term = reverse_kl_reference(student_logits, teacher_logits, temperature=temperature)
    elif kl == "topk":
        term = topk_kl_reference(student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature=temperature)
    else:
        term = kl_from_logprob_diff(logp - teacher_logprobs.to(logp.dtype), kl)
    zero = torch.zeros_like(term)
    term = torch.where(valid, term, zero)
    logp = torch.where(valid, logp, zero)
    return OPDAdvantages(advantages.to(term.dtype) - coef * term, term, logp)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (forward only): the row kernels with the fused epilogue, one launch per call.
# ----------------------------------------------------------------------------------------------------------
def _row_inputs(plan, tokens, advantages, mask):
    """tokens, advantages, mask over the kernel rows; gap rows are masked out (mask is None when unneeded)."""
    if mask is None and plan.index_strides is not None and plan.rows != plan.numel:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    rows_mask = None if mask is None else _rows.to_rows(mask, plan, False)
    return _rows.to_rows(tokens, plan, 0), _rows.to_rows(advantages, plan, 0.0), rows_mask


@torch.library.custom_op("opd_kernels::opd_sampled_fwd", mutates_args=())
def opd_sampled_fwd(logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                    teacher_logprobs: torch.Tensor, mask: torch.Tensor | None, coef: float, temperature: float,
                    kl_kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages', kl, student_logprobs) [...] for kl_kind 1/2/3 = k1/k2/k3; inputs fp32, mask bool."""
    _checks.token_values(tokens, logits.shape[-1], mask_=mask)
    plan = _rows.plan_rows(logits)
    if plan.rows == 0:
        return _sampled_fake(logits, tokens, advantages, teacher_logprobs, mask, coef, temperature, kl_kind)
    rows_tokens, rows_adv, rows_mask = _row_inputs(plan, tokens, advantages, mask)
    kern = _backend.kernels(logits.device.type)
    out = kern.opd_sampled_fwd(_rows.rows_view(logits, plan), rows_tokens, rows_adv,
                               _rows.to_rows(teacher_logprobs, plan, 0.0), rows_mask, coef, 1.0 / temperature,
                               kl_kind)
    return tuple(_rows.from_rows(t, plan) for t in out)


@opd_sampled_fwd.register_fake
def _sampled_fake(logits, tokens, advantages, teacher_logprobs, mask, coef, temperature, kl_kind):
    return tuple(logits.new_empty(tokens.shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("opd_kernels::opd_full_fwd", mutates_args=())
def opd_full_fwd(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor | None, coef: float, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages', exact kl, student_logprobs) [...], one pass over both rows; inputs fp32, mask bool."""
    _checks.token_values(tokens, student.shape[-1], mask_=mask)
    ps, pt = pair_plans(student, teacher)
    if ps.rows == 0:
        return _full_fake(student, teacher, tokens, advantages, mask, coef, temperature)
    rows_tokens, rows_adv, rows_mask = _row_inputs(ps, tokens, advantages, mask)
    kern = _backend.kernels(student.device.type)
    out = kern.opd_full_fwd(_rows.rows_view(student, ps), _rows.rows_view(teacher, pt), rows_tokens, rows_adv,
                            rows_mask, coef, 1.0 / temperature)
    return tuple(_rows.from_rows(t, ps) for t in out)


@opd_full_fwd.register_fake
def _full_fake(student, teacher, tokens, advantages, mask, coef, temperature):
    return tuple(student.new_empty(tokens.shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("opd_kernels::opd_topk_fwd", mutates_args=())
def opd_topk_fwd(logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, mask: torch.Tensor | None, coef: float, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages', top-K kl, student_logprobs) [...]: the log-prob row kernel (token log-prob and lse in one
    pass) and the O(K) top-K epilogue."""
    _checks.token_values(tokens, logits.shape[-1], mask_=mask)
    plan, ids_r, lq_r, valid_r = topk_rows(logits, topk_ids, topk_logprobs, mask)
    _checks.topk_values(ids_r, lq_r, logits.shape[-1], valid_r)
    if plan.rows == 0:
        return _topk_fake(logits, tokens, advantages, topk_ids, topk_logprobs, mask, coef, temperature)
    rows_tokens = _rows.to_rows(_epilogue.masked_tokens(tokens, mask), plan, _epilogue.MASKED_TOKEN)
    x, inv_t = _rows.rows_view(logits, plan), 1.0 / temperature
    logp, _, lse = _backend.kernels(logits.device.type).logprob_fwd(x, rows_tokens, inv_t, 0, _epilogue.MASKED_TOKEN,
                                                                    False)
    kl, _ = topk_terms(x, ids_r, lq_r, lse.double(), valid_r, inv_t, 0, logits.shape[-1])
    out = _epilogue.apply_advantage(_rows.to_rows(advantages, plan, 0.0), kl.float(), logp,
                                    None if mask is None else valid_r, coef)
    return tuple(_rows.from_rows(t, plan) for t in out)


@opd_topk_fwd.register_fake
def _topk_fake(logits, tokens, advantages, topk_ids, topk_logprobs, mask, coef, temperature):
    return tuple(logits.new_empty(tokens.shape, dtype=torch.float32) for _ in range(3))


def _sharded(student_logits, tokens, advantages, teacher_logprobs, teacher_logits, teacher_topk, mask, coef,
             temperature, kl, group) -> OPDAdvantages:
    vocab_start, vocab_total = _tp.shard_range(student_logits, group)
    _checks.token_values(tokens, vocab_total, mask_=mask)
    masked = _epilogue.masked_tokens(tokens, mask)
    if kl == "full":
        term, _, _, logp = sharded_kl(student_logits, teacher_logits, masked, temperature,
                                      _epilogue.MASKED_TOKEN, group)
        term = term.float()
    elif kl == "topk":
        V, K = student_logits.shape[-1], teacher_topk[0].shape[-1]
        valid = masked != _epilogue.MASKED_TOKEN
        ids, lq = teacher_topk[0].reshape(-1, K), teacher_topk[1].reshape(-1, K)
        _checks.topk_values(ids, lq, vocab_total, valid.reshape(-1))
        logp, _, lse = sharded_logprobs(student_logits, masked, temperature, _epilogue.MASKED_TOKEN, False, group)
        term, _ = topk_terms(student_logits.reshape(-1, V), ids, lq, lse.reshape(-1), valid.reshape(-1),
                             1.0 / temperature, vocab_start, vocab_total, group)
        term = term.float().reshape(logp.shape)
    else:
        logp, _, _ = sharded_logprobs(student_logits, masked, temperature, _epilogue.MASKED_TOKEN, False, group)
        term = _epilogue.kl_from_diff(logp - teacher_logprobs, _epilogue.KL_CODES[kl])
    return OPDAdvantages(*_epilogue.apply_advantage(advantages, term, logp, mask, coef))


def _teacher_inputs(kl, student_logits, teacher_logprobs, teacher_logits, teacher_topk_ids, teacher_topk_logprobs,
                    sharded: bool):
    """Exactly the teacher inputs of this ``kl`` kind (clear errors otherwise): (teacher_logprobs as fp32,
    teacher_logits over the student's vocabulary)."""
    given = {name for name, v in (("teacher_logprobs", teacher_logprobs), ("teacher_logits", teacher_logits),
                                  ("teacher_topk_ids", teacher_topk_ids),
                                  ("teacher_topk_logprobs", teacher_topk_logprobs)) if v is not None}
    wanted = {"full": {"teacher_logits"}, "topk": {"teacher_topk_ids", "teacher_topk_logprobs"}}.get(
        kl, {"teacher_logprobs"})
    if given != wanted:
        raise ValueError(f"kl={kl!r} takes {' and '.join(sorted(wanted))} (got {', '.join(sorted(given)) or 'none'}): "
                         "k1/k2/k3 use teacher_logprobs of the sampled tokens, 'full' teacher_logits, 'topk' the "
                         "teacher's top-K ids and log-probs")
    if kl == "full":
        teacher_logits = _checks.pair(student_logits, teacher_logits, "student_logits", "teacher_logits",
                                      sharded=sharded)
    elif kl == "topk":
        _checks.topk(teacher_topk_ids, teacher_topk_logprobs, student_logits)
    else:
        teacher_logprobs = _checks.float_values(teacher_logprobs, student_logits, "teacher_logprobs")
    return teacher_logprobs, teacher_logits


@torch.no_grad()
def opd_advantages(student_logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor, *,
                   teacher_logprobs: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                   teacher_topk_ids: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
                   coef: float = 1.0, temperature: float = 1.0, kl: str = "k1", mask: torch.Tensor | None = None,
                   process_group=None) -> OPDAdvantages:
    """OPD-penalised advantages ``A - coef * kl`` in one read of the student logits.

    Args:
        student_logits: [..., V] float32 / bfloat16 / float16, any strides (this rank's vocabulary shard under
            tensor parallelism).
        tokens: [...] int64 sampled token ids in [0, V) where mask != 0 (masked positions may hold anything).
        advantages: [...] float, the base estimator's advantages.
        teacher_logprobs: [...] float, log p_T(token) at the same temperature; required for k1/k2/k3.
        teacher_logits: [..., V] like ``student_logits``; required for kl="full".
        teacher_topk_ids / teacher_topk_logprobs: [..., K] the teacher's top-K ids and log-probs; required for
            kl="topk" (``topk_kl`` has the rules).
        coef: the OPD coefficient (finite).
        temperature: > 0, applied to the student (and teacher) logits.
        kl: "k1" | "k2" | "k3" (sampled, from ``teacher_logprobs``), "full" (exact, from ``teacher_logits``) or
            "topk" (from the teacher's top-K).
        mask: [...] bool (or numbers, 0 = masked out): masked positions get kl = 0 and keep their advantage.
        process_group: a torch.distributed group over which the vocabulary is sharded, or None.

    Returns:
        OPDAdvantages(advantages, kl, student_logprobs), each [...] float32, detached.
    """
    _checks.logits(student_logits, "student_logits")
    _checks.tokens(tokens, student_logits)
    if kl not in KL_KINDS:
        raise ValueError(f"unknown kl {kl!r}; choose one of {KL_KINDS}")
    advantages = _checks.float_values(advantages, student_logits, "advantages")
    coef = _checks.finite_scalar(coef, "coef")
    temperature = _checks.positive_scalar(temperature, "temperature")
    mask = _checks.mask(mask, student_logits)
    teacher_logprobs, teacher_logits = _teacher_inputs(kl, student_logits, teacher_logprobs, teacher_logits,
                                                       teacher_topk_ids, teacher_topk_logprobs,
                                                       sharded=process_group is not None)
    if process_group is not None:
        return _sharded(student_logits, tokens, advantages, teacher_logprobs, teacher_logits,
                        (teacher_topk_ids, teacher_topk_logprobs), mask, coef, temperature, kl, process_group)
    if kl == "full":
        return OPDAdvantages(*opd_full_fwd(student_logits, teacher_logits, tokens, advantages, mask, coef,
                                           temperature))
    if kl == "topk":
        return OPDAdvantages(*opd_topk_fwd(student_logits, tokens, advantages, teacher_topk_ids, teacher_topk_logprobs,
                                           mask, coef, temperature))
    return OPDAdvantages(*opd_sampled_fwd(student_logits, tokens, advantages, teacher_logprobs, mask, coef,
                                          temperature, _epilogue.KL_CODES[kl]))
