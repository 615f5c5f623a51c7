"""Output layer + log-prob / entropy / reverse KL, chunked over tokens: the [T, V] logits are never materialised.

Math, z = h W^T / temperature (h [T, d] the final hidden states, W [V, d] the output layer), p = softmax(z):
  logp = log p[token]     entropy = -sum_v p_v log p_v     kl = KL(p || q), q from the teacher:
    ``LinearTeacher``: q = softmax(h_t W_t^T / temperature), the teacher's own final hidden states [T, d_t] and head
        [V_t >= V, d_t] (any hidden size; a padded head is read over the student's V rows); no gradient;
    ``TopKTeacher``: the teacher's top-K (id, log-prob) pairs plus one tail bucket (``topk_kl.py``).
  With G = d loss / d logits (formed by the row ops' backward): d/dh = G W, d/dW = G^T h.
Algorithm (the Cut-Cross-Entropy / Liger fused-linear idea applied to OPD): the forward loops over chunks of C token
rows; logits_c = h_c W^T is ONE [C, V] buffer that the row ops (``token_logprobs``, ``reverse_kl``, ``topk_kl``
pieces) reduce to per-row values, and only per-row scalars (lse, entropy, kl, ...) are kept for the backward. The
backward recomputes logits_c (and the teacher's chunk), overwrites it with G_c (the row ops' in-place backward,
from the per-row upstream gradients), and accumulates grad_h[c] = G_c W and grad_W += G_c^T h_c.
Memory: one [C, V] buffer (two with a teacher's chunk; the top-K KL's gradient adds one) and O(T) per-row scalars
instead of O(T V); the price is one more logits matmul (the backward's recompute). C by default: the most rows with
C * V * 4 bytes <= :data:`CHUNK_BYTES` (``chunk_size`` overrides it). A low-precision weight gets an fp32 gradient
accumulator [V, d] (summing per-chunk bf16 products would round once per chunk), cast once at the end.
Tensor parallelism (``process_group``): W is this rank's vocabulary shard [V / world, d] (Megatron's
ColumnParallelLinear with ``parallel_output``), the row ops all-reduce per-row scalars only, and the backward
all-reduces grad_h (each rank's G_c W is its shard's share), so the op replaces output layer + loss wholesale.
Reference: the materialised path, ``h @ W.T`` then the row ops (:func:`fused_linear_reference`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _checks, _tp
from .opd_advantages import opd_advantages
from .reverse_kl import kl_fwd, kl_grad_inplace_, reverse_kl_reference, sharded_kl
from .token_logprobs import logprob_grad_inplace_, sharded_logprobs, token_logprobs_fwd, token_logprobs_reference
from .topk_kl import sharded_topk, topk_grad, topk_kl_fwd, topk_kl_reference

CHUNK_BYTES = 64 << 20


class LinearTeacher(NamedTuple):
    """A teacher given by its final hidden states [..., d_t] (same positions as the student's) and its output
    weight [V_t, d_t] (V_t >= V unsharded: rows beyond the student's V are padding; V_t = V_r under TP)."""
    hidden: torch.Tensor
    weight: torch.Tensor


class TopKTeacher(NamedTuple):
    """A teacher given by its top-K token ids [..., K] (int64, global) and log-probs [..., K] per position."""
    ids: torch.Tensor
    logprobs: torch.Tensor


class FusedLinearOutput(NamedTuple):
    logp: torch.Tensor                  # [...] fp32: log p(token); 0 on ignored rows
    entropy: torch.Tensor | None        # [...] fp32 when return_entropy, else None
    kl: torch.Tensor | None             # [...] fp32 KL(p || q) when a teacher is given (0 on ignored rows)


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: the most with rows * vocab * 4 bytes <= CHUNK_BYTES (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def fused_linear_reference(hidden, weight, tokens, *, temperature=1.0, return_entropy=False, ignore_index=-100,
                           teacher=None) -> FusedLinearOutput:
    """Plain PyTorch, materialised: logits = hidden @ weight.T ([..., V] in the inputs' dtype), then the row ops'
    references (log_softmax in at least fp32). The oracle with float64 inputs; PyTorch's own path otherwise."""
    logits = hidden @ weight.T
    logp, entropy = token_logprobs_reference(logits, tokens, temperature=temperature, return_entropy=True,
                                             ignore_index=ignore_index)
    valid = tokens != ignore_index
    kl = None
    if isinstance(teacher, LinearTeacher):
        t_logits = (teacher.hidden @ teacher.weight[:weight.shape[0]].T).detach()
        kl = reverse_kl_reference(logits, t_logits, temperature=temperature, mask=valid)
    elif isinstance(teacher, TopKTeacher):
        kl = topk_kl_reference(logits, teacher.ids, teacher.logprobs, temperature=temperature, mask=valid)
    return FusedLinearOutput(logp, entropy if return_entropy else None, kl)


# ----------------------------------------------------------------------------------------------------------
# The chunked forward / backward
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    temperature: float
    with_entropy: bool
    ignore_index: int
    chunk: int
    group: object
    kl: str | None            # None, "exact" or "topk"


def _spans(n: int, chunk: int):
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _vocab_range(weight: torch.Tensor, group) -> tuple[int, int]:
    """(vocab_start, vocab_total) of this rank's weight shard [V_r, d] (Megatron's equal shards)."""
    if group is None:
        return 0, weight.shape[0]
    return _tp.shard_range(weight.T, group)   # shard_range reads the vocabulary from the last dim


def _logprob_rows(z, tok, cfg: _Config):
    """(logp fp32, entropy fp32 or [0], lse float64) [C] of one chunk, global under TP."""
    if cfg.group is None:
        return token_logprobs_fwd(z, tok, cfg.temperature, 0, z.shape[1], cfg.ignore_index, cfg.with_entropy)
    return sharded_logprobs(z, tok, cfg.temperature, cfg.ignore_index, cfg.with_entropy, cfg.group)


def _kl_rows(z, zt, ids, lq, valid, cfg: _Config):
    """(kl float64, a, b) [C]: (kl, lse_s, lse_t) for the exact KL, (kl, lse, r_tail) for the top-K one."""
    if cfg.kl == "exact":
        if cfg.group is None:
            _, lse_s, lse_t, _, kl = kl_fwd(z, zt, None, cfg.temperature, 0, z.shape[1], -100)
        else:
            kl, lse_s, lse_t, _ = sharded_kl(z, zt, None, cfg.temperature, -100, cfg.group)
        return torch.where(valid, kl, torch.zeros_like(kl)), lse_s, lse_t
    if cfg.group is None:
        _, kl, lse, r_tail = topk_kl_fwd(z, ids, lq, valid, cfg.temperature)
        return kl, lse, r_tail
    return sharded_topk(z, ids, lq, valid, cfg.temperature, cfg.group)


def _chunk_grad_(z, zt, tok, ids, lq, saved, grads, cfg: _Config, vocab: tuple[int, int]):
    """Overwrites the chunk's logits z [C, V] with G_c = d loss / d logits_c (the row ops' in-place backward, from the
    per-row upstream gradients; None: that output is unused) and returns it: no second [C, V] buffer, except the
    top-K KL's gradient, which has no in-place form."""
    lse, entropy, kl, a, b = saved
    g_logp, g_ent, g_kl = grads
    with_lp = g_logp is not None or g_ent is not None
    g_logp = torch.zeros_like(lse, dtype=torch.float32) if g_logp is None and with_lp else g_logp
    lp = dict(grad_entropy=g_ent, entropy=None if g_ent is None else entropy, ignore_index=cfg.ignore_index,
              vocab_start=vocab[0], temperature=cfg.temperature)
    if g_kl is None:
        return logprob_grad_inplace_(z, tok, g_logp, lse, **lp)
    valid = tok != cfg.ignore_index
    g_kl = torch.where(valid, g_kl.float(), torch.zeros_like(g_kl, dtype=torch.float32))
    if cfg.kl == "exact":   # one call: the KL part plus (with_lp) the log-prob / entropy part
        return kl_grad_inplace_(z, zt, g_kl, a, b, kl, tokens=tok if with_lp else None, sharded=cfg.group is not None,
                                grad_logp=g_logp, **lp)
    part = topk_grad(z, ids, lq, g_kl, a, kl, b, valid, 1.0 / cfg.temperature, vocab[0], vocab[1])
    if not with_lp:
        return z.copy_(part)
    return logprob_grad_inplace_(z, tok, g_logp, lse, **lp).add_(part)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, t_hidden, t_weight, ids, lq, cfg: _Config):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, entropy = torch.zeros(n, **f32), torch.zeros(n if cfg.with_entropy else 0, **f32)
        lse = torch.zeros(n, dtype=torch.float64, device=hidden.device)
        kl, a, b = (torch.zeros(n if cfg.kl else 0, dtype=torch.float64, device=hidden.device) for _ in range(3))
        for c in _spans(n, cfg.chunk):
            z = hidden[c] @ weight.T                                                   # [C, V]: the one chunk
            logp[c], ent_c, lse[c] = _logprob_rows(z, tokens[c], cfg)
            if cfg.with_entropy:
                entropy[c] = ent_c
            if cfg.kl:
                zt = None if cfg.kl != "exact" else t_hidden[c] @ t_weight.T
                kl[c], a[c], b[c] = _kl_rows(z, zt, _at(ids, c), _at(lq, c), tokens[c] != cfg.ignore_index, cfg)
                del zt
            del z
        ctx.save_for_backward(hidden, weight, tokens, t_hidden, t_weight, ids, lq, lse, entropy, kl, a, b)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return logp, entropy, kl.float()

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        hidden, weight, tokens, t_hidden, t_weight, ids, lq, lse, entropy, kl, a, b = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_ent = g_ent if cfg.with_entropy else None
        g_kl = g_kl if cfg.kl else None
        if (g_logp is None and g_ent is None and g_kl is None) or not (want_h or want_w):
            return None, None, None, None, None, None, None, None
        grad_h = torch.zeros_like(hidden) if want_h else None
        # fp32 accumulation for a low-precision weight (module docstring); an fp32 weight accumulates in place
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if want_w else None
        vocab = _vocab_range(weight, cfg.group)
        for c in _spans(hidden.shape[0], cfg.chunk):
            z = hidden[c] @ weight.T
            zt = t_hidden[c] @ t_weight.T if cfg.kl == "exact" and g_kl is not None else None
            saved = (lse[c], entropy[c] if cfg.with_entropy else entropy, _at(kl, c), _at(a, c), _at(b, c))
            grads = tuple(None if g is None else g[c] for g in (g_logp, g_ent, g_kl))
            grad_z = _chunk_grad_(z, zt, tokens[c], _at(ids, c), _at(lq, c), saved, grads, cfg, vocab)
            del z, zt
            if want_h:
                torch.mm(grad_z, weight, out=grad_h[c])
            if want_w:
                grad_w.addmm_(grad_z.T.to(grad_w.dtype), hidden[c].to(grad_w.dtype))
            del grad_z
        if want_h and cfg.group is not None:
            dist.all_reduce(grad_h, group=cfg.group)     # every shard's G W contributes to the replicated h
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None, None


def _at(t: torch.Tensor | None, c: slice):
    return None if t is None or t.numel() == 0 else t[c]


class _Rows:
    """The rows that have a value (a token to score / mask on): only they go through the output layer. A prompt
    row, the usual majority in RL batches, would cost a [V, d] matmul forward and three backward for a 0; an
    ignored row's outputs are 0 (``put``'s fill) and it gets no gradient (``take`` is differentiable)."""

    def __init__(self, keep: torch.Tensor):
        self.n = keep.numel()
        self.index = None if bool(keep.all()) else keep.nonzero().squeeze(1)

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or self.index is None else t.index_select(0, self.index)

    def put(self, t: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """[n] with ``t`` at the kept rows and ``fill`` (default 0) elsewhere."""
        if self.index is None:
            return t
        base = t.new_zeros(self.n) if fill is None else fill.to(t.dtype)
        return base.index_copy(0, self.index, t)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
def _check_linear(hidden, weight, name: str) -> None:
    for t, what in ((hidden, "hidden"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name}{what} must be float32, bfloat16 or float16, got {t.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{name}hidden [..., d] and {name}weight [V, d] do not match: got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"{name}hidden ({hidden.dtype}, {hidden.device}) and {name}weight ({weight.dtype}, "
                         f"{weight.device}) must share dtype and device")


def _teacher_args(teacher, hidden, weight, tokens, sharded: bool):
    """(kind, t_hidden [T, d_t], t_weight [V, d_t], ids [T, K], lq [T, K]) flattened, with clear errors."""
    if teacher is None:
        return None, None, None, None, None
    V = weight.shape[0]
    if isinstance(teacher, LinearTeacher):
        _check_linear(teacher.hidden, teacher.weight, "teacher.")
        if tuple(teacher.hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"teacher.hidden {tuple(teacher.hidden.shape)} must cover the student's positions "
                             f"{tuple(hidden.shape[:-1])}")
        Vt = teacher.weight.shape[0]
        if Vt < V or (Vt != V and sharded):
            raise ValueError(f"teacher.weight has {Vt} vocabulary rows, the student's weight {V}: the teacher must "
                             "use the student's vocabulary (a padded teacher head is accepted unsharded only)")
        if teacher.hidden.requires_grad and torch.is_grad_enabled():
            raise ValueError("the teacher gets no gradient; pass teacher.hidden.detach()")
        t_hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        return "exact", t_hidden, teacher.weight[:V].detach(), None, None
    if isinstance(teacher, TopKTeacher):
        # the check reads the logits' shape and device only: a broadcast stand-in, nothing allocated
        _checks.topk(teacher.ids, teacher.logprobs, hidden.new_empty(()).expand(*tokens.shape, V))
        K = teacher.ids.shape[-1]
        return "topk", None, None, teacher.ids.reshape(-1, K), teacher.logprobs.reshape(-1, K)
    raise TypeError(f"teacher must be None, a LinearTeacher or a TopKTeacher, got {type(teacher).__name__}")


def _chunk_rows(chunk_size, weight: torch.Tensor) -> int:
    chunk = default_chunk_rows(weight.shape[0]) if chunk_size is None else _checks.integer(chunk_size, "chunk_size")
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1 (token rows per chunk) or None, got {chunk}")
    return chunk


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100,
                          teacher: LinearTeacher | TopKTeacher | None = None, chunk_size: int | None = None,
                          process_group=None) -> FusedLinearOutput:
    """log p(token), the entropy and KL(p || teacher) of p = softmax(hidden @ weight.T / temperature), chunked.

    Args:
        hidden: [..., d] float32 / bfloat16 / float16 (the final hidden states); differentiable.
        weight: [V, d] the output layer, same dtype (this rank's vocabulary shard under TP); differentiable.
        tokens: [...] int64 global token ids in [0, V) or ``ignore_index`` (such rows give 0 everywhere).
        temperature: > 0.
        return_entropy: also compute the entropy.
        ignore_index: the token of rows to skip (log-prob, entropy and KL 0, zero gradient).
        teacher: None, :class:`LinearTeacher` (exact KL) or :class:`TopKTeacher` (top-K + tail bucket KL).
        chunk_size: token rows per chunk (default :func:`default_chunk_rows`).
        process_group: the group over which the vocabulary (weight's rows) is sharded, or None.

    Returns:
        FusedLinearOutput(logp, entropy or None, kl or None), each [...] float32, differentiable w.r.t. hidden
        and weight.
    """
    _check_linear(hidden, weight, "")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
        raise TypeError("tokens must be an int64 tensor of token ids")
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"tokens {tuple(tokens.shape)} must have hidden's positions {tuple(hidden.shape[:-1])}")
    temperature = _checks.positive_scalar(temperature, "temperature")
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    chunk = _chunk_rows(chunk_size, weight)
    kind, t_hidden, t_weight, ids, lq = _teacher_args(teacher, hidden, weight, tokens, process_group is not None)
    cfg = _Config(temperature, bool(return_entropy), ignore_index, chunk, process_group, kind)
    flat_tokens, h = tokens.reshape(-1), hidden.reshape(-1, hidden.shape[-1])
    rows = _Rows(flat_tokens != ignore_index)
    logp, entropy, kl = _FusedLinear.apply(rows.take(h), weight, rows.take(flat_tokens), rows.take(t_hidden),
                                           t_weight, rows.take(ids), rows.take(lq), cfg)
    shape = tokens.shape
    return FusedLinearOutput(rows.put(logp).view(shape), rows.put(entropy).view(shape) if return_entropy else None,
                             rows.put(kl).view(shape) if kind else None)


class FusedOPDAdvantages(NamedTuple):
    advantages: torch.Tensor        # [...] as OPDAdvantages
    kl: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None  # [...] fp32 log p_T(token): the input (k1/k2/k3), from the teacher's
    #                                        chunk logits (full: computed once for both), None (topk: not in the rows)


@torch.no_grad()
def fused_linear_opd_advantages(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                                advantages: torch.Tensor, *, teacher_logprobs: torch.Tensor | None = None,
                                teacher: LinearTeacher | TopKTeacher | None = None, kl: str = "k1",
                                coef: float = 1.0, temperature: float = 1.0, mask: torch.Tensor | None = None,
                                chunk_size: int | None = None, process_group=None) -> FusedOPDAdvantages:
    """``opd_advantages`` of the logits ``hidden @ weight.T``, one chunk of rows at a time (no gradients).

    ``kl``: "k1" / "k2" / "k3" with ``teacher_logprobs`` [...]; "full" with a :class:`LinearTeacher`; "topk" with a
    :class:`TopKTeacher`. Other arguments as in :func:`fused_linear_logprobs` and ``opd_advantages``. With a
    :class:`LinearTeacher` the teacher's token log-probs (tokens of -100 give 0) come from the chunk logits that the
    KL reads, so a caller needs no second teacher head matmul for them."""
    _check_linear(hidden, weight, "")
    want = {"full": LinearTeacher, "topk": TopKTeacher}.get(kl)
    if (want is None) != (teacher is None) or (want is not None and not isinstance(teacher, want)):
        raise ValueError(f"kl={kl!r} takes {want.__name__ if want else 'teacher_logprobs and no teacher'}")
    kind, t_hidden, t_weight, ids, lq = _teacher_args(teacher, hidden, weight, tokens, process_group is not None)
    chunk = _chunk_rows(chunk_size, weight)
    shape = tokens.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    tok, adv_in, lp_t, m = flat(tokens), flat(advantages), flat(teacher_logprobs), flat(mask)
    # masked rows keep A and get KL 0 without being computed; the rows left are all masked in, so no mask below
    rows = _Rows(torch.ones_like(tok, dtype=torch.bool) if m is None else m != 0)
    h, tok, adv, lp_t = (rows.take(t) for t in (hidden.reshape(-1, hidden.shape[-1]), tok, adv_in, lp_t))
    t_hidden, ids, lq = rows.take(t_hidden), rows.take(ids), rows.take(lq)
    outs, teacher_lp = [], []
    teacher_rows = _Config(temperature, False, -100, chunk, process_group, None)   # log-probs of the teacher's chunk
    for c in _spans(h.shape[0], chunk):
        if kind == "exact":
            zt = t_hidden[c] @ t_weight.T
            teacher_lp.append(_logprob_rows(zt, tok[c], teacher_rows)[0])
            source = dict(teacher_logits=zt)
        else:
            source = (dict(teacher_topk_ids=ids[c], teacher_topk_logprobs=lq[c]) if kind == "topk" else
                      dict(teacher_logprobs=lp_t[c]))
        outs.append(opd_advantages(h[c] @ weight.T, tok[c], adv[c], kl=kl, coef=coef, temperature=temperature,
                                   process_group=process_group, **source))
    lp_t = rows.put(_cat(teacher_lp, h)).view(shape) if kind == "exact" else teacher_logprobs
    a, k, lp = (_cat([o[i] for o in outs], h) for i in range(3))
    return FusedOPDAdvantages(rows.put(a, fill=adv_in).view(shape), rows.put(k).view(shape),
                              rows.put(lp).view(shape), lp_t)


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The chunks' values, [0] when every row is masked out."""
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32, device=like.device)
