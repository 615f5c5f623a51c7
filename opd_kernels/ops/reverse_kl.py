"""Exact reverse KL(p_S || p_T) per row, p = softmax(logits / T), fused over the vocabulary.

Math, z = logits / T: KL = sum_v p_S (log p_S - log p_T);
  d KL / d student_logits = p_S * (log p_S - log p_T - KL) / T     (the teacher gets no gradient).
Shapes: student/teacher [..., V] (any float dtypes, each read as it is; any strides; a padded teacher
[..., V' > V] is read over the student's V columns) -> fp32 [...].
Memory: ONE pass over both rows per row (online softmax with rescaling for both); the forward saves the two
per-row log-sum-exps and KL, and the backward recomputes both softmaxes from the logits. Under tensor
parallelism only per-row scalars are all-reduced (``_tp.py``). Rows with mask == 0 give 0 and a zero gradient.
In-place backward (``inplace_backward=True``; ``_inplace.py``): the forward overwrites the STUDENT logits with
p_s (log p_s - log p_t - KL) / T (0 on masked rows) during its one pass; the backward scales each row by grad_kl
in place. ``kl_fwd_grad_`` / ``kl_grad_inplace_`` are the same kernels without autograd.
"""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks, _inplace, _rows, _tp
from .token_logprobs import token_logprobs_bwd


def reverse_kl_reference(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """Plain PyTorch (two log_softmax): the oracle (pass float64) and the benchmark baseline."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    p = ls.exp()
    kl = torch.where(p > 0, p * (ls - lt), torch.zeros_like(p)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def pair_plans(student: torch.Tensor, teacher: torch.Tensor):
    """Row plans of the two inputs in one shared row index space (both copied when their layouts differ)."""
    ps, pt = _rows.plan_rows(student), _rows.plan_rows(teacher)
    if _rows.compatible(ps, pt):
        return ps, pt
    ps = ps if ps.index_strides is None and ps.rows == ps.numel else _rows.as_copy(ps)
    pt = pt if pt.index_strides is None and pt.rows == pt.numel else _rows.as_copy(pt)
    return ps, pt


# ----------------------------------------------------------------------------------------------------------
# Custom ops: shard-local values (with one shard: the final ones), dispatched to the chosen row backend.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd_kernels::kl_fwd", mutates_args=())
def kl_fwd(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor | None, temperature: float,
           vocab_start: int, vocab_total: int, ignore_index: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl fp32, lse_s, lse_t, logp_s fp32 or [0], kl float64) [...] of this shard, one pass over both rows.

    The float64 copy of kl (like the lse) is what the backward uses: it forms (zs - zt) - (kl + lse_s - lse_t),
    a small difference of numbers of size |lse| where the student is confident and the teacher is not."""
    if tokens is not None:
        _checks.token_values(tokens, vocab_total, ignore_index)
    ps, pt = pair_plans(student, teacher)
    if ps.rows == 0:
        return _kl_fwd_fake(student, teacher, tokens, temperature, vocab_start, vocab_total, ignore_index)
    rows_tokens = None if tokens is None else _rows.to_rows(tokens, ps, ignore_index)
    kern = _backend.kernels(student.device.type)
    kl, lse_s, lse_t, logp = kern.kl_fwd(_rows.rows_view(student, ps), _rows.rows_view(teacher, pt), rows_tokens,
                                         1.0 / temperature, vocab_start, ignore_index)
    logp = logp if tokens is None else _rows.from_rows(logp, ps)
    kl = _rows.from_rows(kl.double(), ps)
    return kl.float(), _rows.from_rows(lse_s.double(), ps), _rows.from_rows(lse_t.double(), ps), logp, kl


@kl_fwd.register_fake
def _kl_fwd_fake(student, teacher, tokens, temperature, vocab_start, vocab_total, ignore_index):
    out = student.new_empty(student.shape[:-1], dtype=torch.float32)
    logp = torch.empty_like(out) if tokens is not None else student.new_empty(0, dtype=torch.float32)
    f64 = torch.empty_like(out, dtype=torch.float64)
    return out, f64, torch.empty_like(f64), logp, torch.empty_like(f64)


@torch.library.custom_op("opd_kernels::kl_bwd", mutates_args=())
def kl_bwd(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor, lse_s: torch.Tensor,
           lse_t: torch.Tensor, kl: torch.Tensor, temperature: float) -> torch.Tensor:
    """d/dstudent of sum(grad_kl * KL), from the GLOBAL lse_s, lse_t, KL (all float64)."""
    ps, pt = pair_plans(student, teacher)
    if ps.rows == 0:
        return _rows.empty_grad(student, ps)
    f32 = lambda t: _rows.to_rows(t.float(), ps, 0.0)  # noqa: E731  (gap rows: zero upstream gradient)
    f64 = lambda t: _rows.to_rows(t.double(), ps, 0.0)  # noqa: E731
    kern = _backend.kernels(student.device.type)
    grad = kern.kl_bwd(_rows.rows_view(student, ps), _rows.rows_view(teacher, pt), f32(grad_kl), f64(lse_s),
                       f64(lse_t), f64(kl), 1.0 / temperature)
    return _rows.grad_from_rows(grad, ps)


@kl_bwd.register_fake
def _kl_bwd_fake(student, teacher, grad_kl, lse_s, lse_t, kl, temperature):
    return _rows.empty_grad(student, pair_plans(student, teacher)[0])


def _setup_context(ctx, inputs, output):
    student, teacher, _, temperature, _, _, _ = inputs
    _, lse_s, lse_t, logp, kl = output
    ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse_s, lse_t, logp, kl)


def _backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t, _grad_logp, _grad_kl64):
    student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
    return kl_bwd(student, teacher, grad_kl, lse_s, lse_t, kl, ctx.temperature), None, None, None, None, None, None


kl_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# In-place custom ops: the student buffer is overwritten with the gradient (mutates_args); the teacher is read.
# ----------------------------------------------------------------------------------------------------------
def _inplace_plans(student, teacher):
    ps = _inplace.buffer_plan(student, "student_logits")
    _, pt = pair_plans(student, teacher)  # a writable student keeps its plan; the teacher may be copied
    return ps, pt


@torch.library.custom_op("opd_kernels::kl_fwd_inplace", mutates_args=("student",))
def kl_fwd_inplace(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor | None, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, lse_s, lse_t) float64 [...] over the whole vocabulary, one pass over both rows; student :=
    grad_kl p_s (log p_s - log p_t - KL) / T (grad_kl None = 1; rows with grad_kl == 0: exact zeros)."""
    ps, pt = _inplace_plans(student, teacher)
    if ps.rows == 0:
        return _kl_fwd_inplace_fake(student, teacher, grad_kl, temperature)
    g = None if grad_kl is None else _rows.to_rows(grad_kl.float(), ps, 0.0)
    kern = _inplace.kernel("kl_fwd_inplace", student.device.type)
    out = kern(_rows.rows_view(student, ps), _rows.rows_view(teacher, pt), g, 1.0 / temperature)
    kl, lse_s, lse_t = (_rows.from_rows(t.double(), ps) for t in out)
    return kl, lse_s, lse_t


@kl_fwd_inplace.register_fake
def _kl_fwd_inplace_fake(student, teacher, grad_kl, temperature):
    f64 = student.new_empty(student.shape[:-1], dtype=torch.float64)
    return f64, torch.empty_like(f64), torch.empty_like(f64)


@torch.library.custom_op("opd_kernels::kl_bwd_inplace", mutates_args=("student",))
def kl_bwd_inplace(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor, lse_s: torch.Tensor,
                   lse_t: torch.Tensor, kl: torch.Tensor, temperature: float) -> None:
    """student := what ``kl_bwd`` returns (GLOBAL float64 lse_s, lse_t, KL), written into the buffer."""
    ps, pt = _inplace_plans(student, teacher)
    if ps.rows == 0:
        return
    f64 = lambda t: _rows.to_rows(t.double(), ps, 0.0)  # noqa: E731
    kern = _inplace.kernel("kl_bwd_inplace", student.device.type)
    kern(_rows.rows_view(student, ps), _rows.rows_view(teacher, pt), _rows.to_rows(grad_kl.float(), ps, 0.0),
         f64(lse_s), f64(lse_t), f64(kl), 1.0 / temperature)


@kl_bwd_inplace.register_fake
def _kl_bwd_inplace_fake(student, teacher, grad_kl, lse_s, lse_t, kl, temperature):
    return None


class _InplaceReverseKL(torch.autograd.Function):
    """Forward: student := mask * p_s (log p_s - log p_t - KL) / T (under TP: after the all-reduce, a second pass
    over the shard with the global scalars). Backward: that buffer scaled by grad_kl per row, in place."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, mask, group):
        _inplace.buffer_plan(student, "student_logits")  # refuse before anything is written
        unit = torch.ones(student.shape[:-1], dtype=torch.float32, device=student.device) if mask is None \
            else mask.float()
        if group is None:
            kl = kl_fwd_inplace(student, teacher, unit, temperature)[0]
        else:
            kl, lse_s, lse_t, _ = sharded_kl(student, teacher, None, temperature, -100, group)
            kl_bwd_inplace(student, teacher, unit, lse_s, lse_t, kl, temperature)
        _inplace.record(ctx, student)
        return kl.float()

    @staticmethod
    def backward(ctx, grad_kl):
        return _inplace.scale_rows_(ctx, "student_logits", grad_kl), None, None, None, None


def kl_fwd_grad_(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor | None = None, *,
                 temperature: float = 1.0):
    """One pass over the WHOLE vocabulary (no TP), no autograd: returns (kl, lse_s, lse_t) float64 [...] and
    overwrites ``student`` (a buffer you own: see ``_inplace.py``) with grad_kl p_s (log p_s - log p_t - KL) / T,
    grad_kl None = 1 (rows with grad_kl == 0 get exact zeros, even with NaN logits). The teacher is only read."""
    _checks.logits(student, "student_logits")
    teacher = _checks.pair(student, teacher, "student_logits", "teacher_logits")
    if grad_kl is not None:
        grad_kl = _checks.float_values(grad_kl, student, "grad_kl")
    with torch.no_grad():
        return kl_fwd_inplace(student, teacher, grad_kl, _checks.positive_scalar(temperature, "temperature"))


def kl_grad_inplace_(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor, lse_s: torch.Tensor,
                     lse_t: torch.Tensor, kl: torch.Tensor, *, temperature: float = 1.0, tokens=None, grad_logp=None,
                     grad_entropy=None, entropy=None, ignore_index: int = -100, vocab_start: int = 0,
                     sharded: bool = False) -> torch.Tensor:
    """No autograd: ``student`` (this shard's columns) := grad_kl p_s (log p_s - log p_t - KL) / T from the GLOBAL
    lse_s, lse_t, KL [...] (float64 for full accuracy); with ``tokens`` and ``grad_logp``, PLUS the token_logprobs
    gradient (grad_logp (onehot - p_s) - grad_entropy p_s (log p_s + entropy)) / T of the same logits (lse =
    lse_s): the whole gradient of grad_logp * logp + grad_entropy * entropy + grad_kl * KL. The combined form runs
    in row blocks of up to 64 MiB with one block-sized temporary (the log-prob part), never an [N, V] one.
    ``sharded``: the teacher is this rank's shard (no padded-teacher check). Returns ``student``."""
    _checks.logits(student, "student_logits")
    teacher = _checks.pair(student, teacher, "student_logits", "teacher_logits", sharded=sharded)
    f64 = [_inplace.per_row64(t, student, n) for t, n in ((lse_s, "lse_s"), (lse_t, "lse_t"), (kl, "kl"))]
    args = (_checks.float_values(grad_kl, student, "grad_kl"), *f64, _checks.positive_scalar(temperature, "temperature"))
    with torch.no_grad():
        if tokens is None and grad_logp is None:
            kl_bwd_inplace(student, teacher, *args)
            return student
        if tokens is None or grad_logp is None:
            raise ValueError("the combined log-prob + KL gradient needs both tokens and grad_logp")
        _combined_grad_(student, teacher, args, tokens, grad_logp, grad_entropy, entropy, ignore_index, vocab_start)
    return student


def _combined_grad_(student, teacher, kl_args, tokens, grad_logp, grad_entropy, entropy, ignore_index, vocab_start):
    _checks.tokens(tokens, student)
    grad_kl, lse_s, lse_t, kl, temperature = kl_args
    grad_logp = _checks.float_values(grad_logp, student, "grad_logp")
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("grad_entropy needs the entropy of the forward (entropy=...)")
        grad_entropy = _checks.float_values(grad_entropy, student, "grad_entropy")
        entropy = _checks.float_values(entropy, student, "entropy")
    ps, pt = _inplace_plans(student, teacher)
    if ps.rows == 0:
        return
    xs, xt = _rows.rows_view(student, ps), _rows.rows_view(teacher, pt)
    flat = lambda t: None if t is None else _rows.to_rows(t, ps, 0)  # noqa: E731
    tok, g_lp, g_h, h = flat(tokens), flat(grad_logp), flat(grad_entropy), flat(entropy)
    g_kl, ls, lt, k = flat(grad_kl), flat(lse_s), flat(lse_t), flat(kl)
    no_entropy = student.new_empty(0, dtype=torch.float32)
    for rows in _inplace.row_blocks(*xs.shape):
        part = token_logprobs_bwd(xs[rows], tok[rows], g_lp[rows], None if g_h is None else g_h[rows], ls[rows],
                                  no_entropy if h is None else h[rows], temperature, vocab_start, ignore_index)
        kl_bwd_inplace(xs[rows], xt[rows], g_kl[rows], ls[rows], lt[rows], k[rows], temperature)
        xs[rows] += part


# ----------------------------------------------------------------------------------------------------------
# Tensor parallel
# ----------------------------------------------------------------------------------------------------------
def sharded_kl(student, teacher, tokens, temperature, ignore_index, group):
    """Global (kl, lse_s, lse_t, logp_s) from this rank's vocabulary shards (no autograd); kl is float64."""
    vocab_start, vocab_total = _tp.shard_range(student, group)
    _, lse_s_r, lse_t_r, logp_r, kl_r = kl_fwd(student, teacher, tokens, temperature, vocab_start, vocab_total,
                                               ignore_index)
    own = valid = None
    if tokens is not None:
        valid = tokens != ignore_index
        own = _tp.owned(tokens, vocab_start, student.shape[-1], valid)
    return _tp.combine_kl(kl_r, lse_s_r, lse_t_r, logp_r, own, valid, group)


class _ShardedReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        kl, lse_s, lse_t, _ = sharded_kl(student, teacher, None, temperature, -100, group)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
        ctx.temperature = temperature
        return kl.float()

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        return kl_bwd(student, teacher, grad_kl, lse_s, lse_t, kl, ctx.temperature), None, None, None


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None, process_group=None, inplace_backward: bool = False
               ) -> torch.Tensor:
    """Exact KL(softmax(student / T) || softmax(teacher / T)) per row, one pass over both rows.

    Args:
        student_logits: [..., V] float32 / bfloat16 / float16, any strides; differentiable.
        teacher_logits: [..., V] on the same device, in any float dtype (read as it is, no converted copy); a
            padded teacher [..., V' > V] (same tokenizer) is read over the student's V columns. Gets no gradient
            (detach it: a teacher that requires grad while grad mode is on is refused, not silently ignored).
        temperature: > 0.
        mask: [...] bool (or numbers, 0 = masked out): masked rows give 0 and a zero gradient.
        process_group: a torch.distributed group over which the vocabulary is sharded (both inputs are this
            rank's shard), or None.
        inplace_backward: the caller hands the student logits buffer over: when a gradient is needed, the forward
            overwrites ``student_logits`` with the unit-upstream gradient (0 on masked rows) during its one pass
            (under TP: after the all-reduce, in a second pass over the shard) and the backward scales it in place
            and returns that same storage: fwd + bwd read the logits once and allocate nothing of size [..., V].
            The buffer must have rows at one stride (any contiguous tensor; ValueError otherwise) and must not be
            read or modified afterwards (RuntimeError in the backward if modified). The teacher is only read.

    Returns:
        kl [...] float32, differentiable w.r.t. ``student_logits``.
    """
    _checks.logits(student_logits, "student_logits")
    teacher_logits = _checks.pair(student_logits, teacher_logits, "student_logits", "teacher_logits",
                                  sharded=process_group is not None)
    mask = _checks.mask(mask, student_logits)
    temperature = _checks.positive_scalar(temperature, "temperature")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("reverse_kl differentiates w.r.t. the student logits only; pass teacher_logits.detach()")
    if inplace_backward and student_logits.requires_grad and torch.is_grad_enabled():
        kl = _InplaceReverseKL.apply(student_logits, teacher_logits, temperature, mask, process_group)
    elif process_group is None:
        kl = kl_fwd(student_logits, teacher_logits, None, temperature, 0, student_logits.shape[-1], -100)[0]
    else:
        kl = _ShardedReverseKL.apply(student_logits, teacher_logits, temperature, process_group)
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))
