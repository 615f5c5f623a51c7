r"""Reverse KL against a teacher known by its top-K log-probs: K singletons plus one tail bucket, fused per row.

Math, p = softmax(z / T) over the vocabulary (z = student logits). The teacher gives, per row, K distinct token ids
j_1..j_K with log-probs l_k = log q(j_k) (an SGLang teacher's ``input_top_logprobs``). Partition the vocabulary into
the K singletons {j_k} and the tail B (every other id); P_k = p(j_k), P_B = 1 - sum_k P_k, Q_B = 1 - sum_k q_k:

    KL_K = sum_k P_k (log P_k - l_k) + P_B (log P_B - log Q_B)

is the KL between the two distributions coarsened to those K + 1 buckets. By the log-sum inequality it is a LOWER
bound of KL(p || q') for every teacher distribution q' with these top-K values (whatever q' does inside the tail),
tight when p / q' is constant on the tail, and exact for K = V (no tail: ``topk_kl(x, every id, log_softmax(t))``
equals ``reverse_kl(x, t)``). Gradient (the +1 terms of d(P log P) cancel because the buckets' P sum to 1):

    d KL_K / d z_v = p_v (r_b(v) - KL_K) / T,   r_k = log P_k - l_k,   r_B = log P_B - log Q_B

Cost: ONE pass over each student row in the forward (the row kernels' log-sum-exp; the K logits are gathered) and
one in the backward (``logprob_bwd`` writes p_v (r_B - KL_K) / T into every column, then the K columns get their
own r_k); besides that, O(K) per row. Nothing of size [N, V] is kept.

Numerics: per-row sums in float64; Q_B is floored at :data:`TAIL_FLOOR` (a peaked teacher's top-K can sum to 1 in
fp32), so a student keeping mass in the tail pays a large but finite KL; P_B <= 0 (rounding) contributes 0. Rows
whose K valid ids cover the whole vocabulary have no tail. Slots with id < 0 or id >= V (e.g. rows of a teacher's
padded vocabulary) are unused: their teacher mass stays in the tail bucket.
Shapes: logits [..., V]; ids [..., K] int64; logprobs [..., K] float (any float dtype); mask [...] -> fp32 [...].
Tensor parallelism: the log-sum-exp and two per-row sums are all-reduced; each rank gathers the ids it owns.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _backend
from . import _checks, _rows, _tp

TAIL_FLOOR = 1e-12


def topk_kl_reference(student_logits, topk_ids, topk_logprobs, *, temperature: float = 1.0, mask=None):
    """Plain PyTorch over dense rows: the oracle (pass float64) and the benchmark baseline. Unselected branches
    hold finite stand-ins, so that no 0 * inf reaches the autograd graph."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    V = student_logits.shape[-1]
    logp = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    valid = (topk_ids >= 0) & (topk_ids < V)
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids))
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lp = torch.where(valid, logp.gather(-1, ids), zero)
    lq = torch.where(valid, topk_logprobs.to(dtype), zero)
    p_k = torch.where(valid, lp.exp(), zero)
    head = torch.where(valid, p_k * (lp - lq), zero).sum(-1)
    p_tail = 1 - p_k.sum(-1)
    q_tail = (1 - torch.where(valid, lq.exp(), zero).sum(-1)).clamp_min(TAIL_FLOOR)
    has_tail = (p_tail > 0) & (valid.sum(-1) < V)
    p_safe = torch.where(has_tail, p_tail, torch.ones_like(p_tail))
    kl = head + torch.where(has_tail, p_safe * (p_safe.log() - q_tail.log()), zero)
    return kl if mask is None else torch.where(mask.bool(), kl, zero)


# ----------------------------------------------------------------------------------------------------------
# The per-row epilogue: O(K) work on top of the row kernel's log-sum-exp (shard-local under TP).
# ----------------------------------------------------------------------------------------------------------
def _not_owned(n: int, vocab_total: int, valid: torch.Tensor, device) -> torch.Tensor:
    """Row tokens that make the row kernels compute the lse only: an id of no shard, or ignore (-1) on masked rows."""
    return torch.where(valid, torch.full((n,), vocab_total, dtype=torch.long, device=device),
                       torch.full((n,), -1, dtype=torch.long, device=device))


def _slots(x_rows, ids, lq, lse, inv_t: float, vocab_start: int, vocab_total: int, rows_valid):
    """(own [R, K], col [R, K], lp [R, K] float64 log P_k on owned slots (-inf elsewhere), lq [R, K] float64,
    used [R, K]: the slot holds a real id of the vocabulary)."""
    V = x_rows.shape[1]
    used = (ids >= 0) & (ids < vocab_total) & rows_valid[:, None]
    own = used & (ids >= vocab_start) & (ids < vocab_start + V)
    col = torch.where(own, ids - vocab_start, torch.zeros_like(ids))
    z = x_rows.gather(1, col).float() * inv_t                                      # [R, K] fp32, like the kernels
    safe_lse = torch.where(rows_valid, lse, torch.zeros_like(lse))
    lp = torch.where(own, z.double() - safe_lse[:, None], torch.full_like(safe_lse[:, None], -torch.inf))
    lq64 = torch.where(used, lq.double(), torch.full_like(lp, -torch.inf))
    return own, col, lp, lq64, used


def _combine(head, p_sum, lq64, used, rows_valid, vocab_total: int, group):
    """KL_K [R] and r_B [R] (float64) from the (shard-)local head sum and top-K mass; all-reduced under TP."""
    if group is not None:
        sums = torch.stack([head, p_sum])
        dist.all_reduce(sums, group=group)
        head, p_sum = sums[0], sums[1]
    q_tail = (1 - torch.where(used, lq64.exp(), torch.zeros_like(lq64)).sum(-1)).clamp_min(TAIL_FLOOR)
    p_tail = (1 - p_sum).clamp_min(0)
    has_tail = (p_tail > 0) & (used.sum(-1) < vocab_total)
    r_tail = torch.where(has_tail, p_tail.clamp_min(1e-300).log() - q_tail.log(), torch.zeros_like(p_tail))
    kl = head + torch.where(has_tail, p_tail * r_tail, torch.zeros_like(p_tail))
    zero = torch.zeros_like(kl)
    return torch.where(rows_valid, kl, zero), torch.where(rows_valid, r_tail, zero)


def topk_terms(x_rows, ids, lq, lse, rows_valid, inv_t: float, vocab_start: int, vocab_total: int, group=None):
    """(KL_K, r_B) [R] float64 from a row view, its top-K slots [R, K] and the GLOBAL lse [R] (float64)."""
    own, _, lp, lq64, used = _slots(x_rows, ids, lq, lse, inv_t, vocab_start, vocab_total, rows_valid)
    p = torch.where(own, lp.exp(), torch.zeros_like(lp))
    head = torch.where(own, p * (lp - lq64), torch.zeros_like(lp)).sum(-1)
    return _combine(head, p.sum(-1), lq64, used, rows_valid, vocab_total, group)


# ----------------------------------------------------------------------------------------------------------
# Custom ops: forward (KL_K and the scalars the backward needs) and backward, on one shard (TP: see below).
# ----------------------------------------------------------------------------------------------------------
def topk_rows(logits, ids, lq, mask):
    """(plan, ids [R, K], logprobs [R, K], valid [R]) over the row view of ``logits`` (gap rows invalid)."""
    plan = _rows.plan_rows(logits)
    n_rows = plan.rows
    K = ids.shape[-1]
    valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device) if mask is None else mask
    if plan.index_strides is None:
        ids_r, lq_r, valid_r = ids.reshape(n_rows, K), lq.reshape(n_rows, K), valid.reshape(n_rows)
    else:   # gap rows of a superset view: masked out
        ids_r = ids.new_full((n_rows, K), -1)
        ids_r.as_strided(plan.batch_shape + (K,), tuple(i * K for i in plan.index_strides) + (1,)).copy_(ids)
        lq_r = lq.new_zeros((n_rows, K))
        lq_r.as_strided(plan.batch_shape + (K,), tuple(i * K for i in plan.index_strides) + (1,)).copy_(lq)
        valid_r = _rows.to_rows(valid, plan, False)
    return plan, ids_r, lq_r, valid_r


@torch.library.custom_op("opd_kernels::topk_kl_fwd", mutates_args=())
def topk_kl_fwd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor | None,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl fp32, kl float64, lse float64, r_tail float64) [...], whole vocabulary on this device."""
    plan, ids_r, lq_r, valid_r = topk_rows(logits, topk_ids, topk_logprobs, mask)
    _checks.topk_values(ids_r, lq_r, logits.shape[-1], valid_r)
    if plan.rows == 0:
        return _fwd_fake(logits, topk_ids, topk_logprobs, mask, temperature)
    V, inv_t = logits.shape[-1], 1.0 / temperature
    x = _rows.rows_view(logits, plan)
    kern = _backend.kernels(logits.device.type)
    _, _, lse = kern.logprob_fwd(x, _not_owned(plan.rows, V, valid_r, logits.device), inv_t, 0, -1, False)
    kl, r_tail = topk_terms(x, ids_r, lq_r, lse.double(), valid_r, inv_t, 0, V)
    kl, lse, r_tail = (_rows.from_rows(t, plan) for t in (kl, lse.double(), r_tail))
    return kl.float(), kl, lse, r_tail


@topk_kl_fwd.register_fake
def _fwd_fake(logits, topk_ids, topk_logprobs, mask, temperature):
    out = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
    f64 = torch.empty_like(out, dtype=torch.float64)
    return out, f64, torch.empty_like(f64), torch.empty_like(f64)


def topk_grad(x_rows, ids, lq, g, lse, kl, r_tail, rows_valid, inv_t: float, vocab_start: int, vocab_total: int):
    """d/dx of sum(g * KL_K) [R, V] from the GLOBAL lse, KL_K, r_B (float64 [R]); g [R] fp32."""
    kern = _backend.kernels(x_rows.device.type)
    n = x_rows.shape[0]
    live = rows_valid & (g != 0)
    # every column: p_v (r_B - KL) / T, i.e. logprob_bwd of a token no shard owns with grad_logp = -g (r_B - KL)
    grad_logp = torch.where(live, -(g.double() * (r_tail - kl)), torch.zeros_like(kl)).float()
    grad = kern.logprob_bwd(x_rows, _not_owned(n, vocab_total, live, x_rows.device), grad_logp, None,
                            torch.where(live, lse, torch.zeros_like(lse)), x_rows.new_empty(0, dtype=torch.float32),
                            inv_t, vocab_start, -1)
    # the K columns, recomputed exactly (not as a correction added in the gradient's dtype: in bf16 the two parts
    # can be ~|r_B| each and cancel): p_k (r_k - KL) / T
    own, col, lp, lq64, _ = _slots(x_rows, ids, lq, lse, inv_t, vocab_start, vocab_total, live)
    vals = (lp.exp() * ((lp - lq64) - kl[:, None]) * (g.double() * inv_t)[:, None]).to(grad.dtype)
    _overwrite(grad, own, col, vals)
    return grad


def _overwrite(grad: torch.Tensor, own: torch.Tensor, col: torch.Tensor, vals: torch.Tensor) -> None:
    """grad[r, col[r, k]] = vals[r, k] where own[r, k], without a host sync: the other slots of a row rewrite the
    value of one owned slot of that row (or, in a row without one, column 0's current value) to the same place."""
    rep = own.to(torch.uint8).argmax(1, keepdim=True)                              # [R, 1] an owned slot, if any
    any_own = own.any(1, keepdim=True)
    rep_col = torch.where(any_own, col.gather(1, rep), torch.zeros_like(rep))
    rep_val = torch.where(any_own, vals.gather(1, rep), grad.gather(1, rep_col))
    grad.scatter_(1, torch.where(own, col, rep_col), torch.where(own, vals, rep_val))


@torch.library.custom_op("opd_kernels::topk_kl_bwd", mutates_args=())
def topk_kl_bwd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor | None,
                grad_kl: torch.Tensor, lse: torch.Tensor, kl: torch.Tensor, r_tail: torch.Tensor,
                temperature: float) -> torch.Tensor:
    plan, ids_r, lq_r, valid_r = topk_rows(logits, topk_ids, topk_logprobs, mask)
    if plan.rows == 0:
        return _rows.empty_grad(logits, plan)
    to = lambda t, fill: _rows.to_rows(t, plan, fill)  # noqa: E731
    grad = topk_grad(_rows.rows_view(logits, plan), ids_r, lq_r, to(grad_kl.float(), 0.0), to(lse, 0.0),
                     to(kl, 0.0), to(r_tail, 0.0), valid_r, 1.0 / temperature, 0, logits.shape[-1])
    return _rows.grad_from_rows(grad, plan)


@topk_kl_bwd.register_fake
def _bwd_fake(logits, topk_ids, topk_logprobs, mask, grad_kl, lse, kl, r_tail, temperature):
    return _rows.empty_grad(logits, _rows.plan_rows(logits))


def _setup_context(ctx, inputs, output):
    logits, ids, lq, mask, temperature = inputs
    _, kl, lse, r_tail = output
    ctx.save_for_backward(logits, ids, lq, mask, lse, kl, r_tail)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(kl, lse, r_tail)


def _backward(ctx, grad_kl, _g64, _glse, _grt):
    logits, ids, lq, mask, lse, kl, r_tail = ctx.saved_tensors
    return topk_kl_bwd(logits, ids, lq, mask, grad_kl, lse, kl, r_tail, ctx.temperature), None, None, None, None


topk_kl_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Tensor parallel: global lse from the shards, then two per-row sums; the backward needs no communication.
# ----------------------------------------------------------------------------------------------------------
def sharded_topk(logits, ids, lq, valid, temperature, group):
    """(kl, lse, r_tail) float64 [N] of flat [N, V_r] shard rows; ids / lq [N, K]; valid [N]."""
    vocab_start, vocab_total = _tp.shard_range(logits, group)
    _checks.topk_values(ids, lq, vocab_total, valid)
    n, inv_t = logits.shape[0], 1.0 / temperature
    tokens = _not_owned(n, vocab_total, valid, logits.device)
    lse_r = _backend.kernels(logits.device.type).logprob_fwd(logits, tokens, inv_t, vocab_start, -1, False)[2]
    top, share = _tp._max_then_shares(lse_r.double(), group)
    total = share.clone()
    dist.all_reduce(total, group=group)
    lse = torch.where(valid, top + torch.log(total), torch.zeros_like(top))
    kl, r_tail = topk_terms(logits, ids, lq, lse, valid, inv_t, vocab_start, vocab_total, group)
    return kl, lse, r_tail


class _ShardedTopkKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, lq, valid, temperature, group):
        kl, lse, r_tail = sharded_topk(logits, ids, lq, valid, temperature, group)
        ctx.save_for_backward(logits, ids, lq, valid, lse, kl, r_tail)
        ctx.args = (temperature, group)
        return kl.float()

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ids, lq, valid, lse, kl, r_tail = ctx.saved_tensors
        temperature, group = ctx.args
        vocab_start, vocab_total = _tp.shard_range(logits, group)
        grad = topk_grad(logits, ids, lq, grad_kl.float().contiguous(), lse, kl, r_tail, valid, 1.0 / temperature,
                         vocab_start, vocab_total)
        return grad, None, None, None, None, None


def topk_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
            temperature: float = 1.0, mask: torch.Tensor | None = None, process_group=None) -> torch.Tensor:
    """KL(p_S || q) over the teacher's top-K ids plus one tail bucket, per row (module docstring).

    Args:
        student_logits: [..., V] float32 / bfloat16 / float16, any strides; differentiable. Under tensor
            parallelism: this rank's vocabulary shard.
        topk_ids: [..., K] int64 global token ids, distinct within a row; slots with id < 0 or >= V are unused.
        topk_logprobs: [..., K] the teacher's log-probs of those ids (any float dtype; normalised, at the student's
            temperature: an SGLang teacher scores at T = 1).
        temperature: > 0; the student distribution is softmax(student_logits / temperature).
        mask: [...] bool (or numbers, 0 = masked out): masked rows give 0 and a zero gradient.
        process_group: a torch.distributed group over which the vocabulary is sharded, or None.

    Returns:
        kl [...] float32, differentiable w.r.t. ``student_logits``.
    """
    _checks.logits(student_logits, "student_logits")
    _checks.topk(topk_ids, topk_logprobs, student_logits)
    mask = _checks.mask(mask, student_logits)
    temperature = _checks.positive_scalar(temperature, "temperature")
    if process_group is None:
        return topk_kl_fwd(student_logits, topk_ids, topk_logprobs, mask, temperature)[0]
    shape, V, K = student_logits.shape[:-1], student_logits.shape[-1], topk_ids.shape[-1]
    valid = (torch.ones(shape, dtype=torch.bool, device=student_logits.device) if mask is None else mask).reshape(-1)
    kl = _ShardedTopkKL.apply(student_logits.reshape(-1, V), topk_ids.reshape(-1, K), topk_logprobs.reshape(-1, K),
                              valid, temperature, process_group)
    return kl.reshape(shape)
