"""log p(token | logits / T) (and the entropy of p) per row, fused over the vocabulary.

Math, z = logits / T, lse = logsumexp(z), p = softmax(z):
  logp    = z[token] - lse                   entropy = lse - sum_v p_v z_v
  d logp / d logits    = (onehot(token) - p) / T
  d entropy / d logits = -p * (log p + entropy) / T
Shapes: logits [..., V] (fp32/bf16/fp16, any strides), tokens [...] int64 -> fp32 [...] (and entropy [...]).
Memory: one pass over each row; the forward saves only lse [...] (and entropy) for the backward, which recomputes
p from the logits: nothing of size [..., V] is kept. Rows whose token == ignore_index give 0 and a zero
gradient. Under tensor parallelism (``process_group``) only per-row scalars are all-reduced (``_tp.py``).
Layout handling (no copy for the LM shift ``logits[:, :-1]``): ``_rows.py``.
In-place backward (``inplace_backward=True``; ``_inplace.py``): the forward overwrites the logits with
(onehot - p) / T during its one pass, the backward scales each row by grad_logp in place: no [..., V] allocation
and one read of the logits for forward + backward. ``logprob_fwd_grad_`` / ``logprob_grad_inplace_`` are the same
kernels without autograd, for callers that hold per-row upstream gradients (the fused linear path's chunks).
"""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks, _inplace, _rows, _tp


def token_logprobs_reference(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                             return_entropy: bool = False, ignore_index: int = -100):
    """Plain PyTorch: the oracle (pass float64 logits) and the benchmark baseline. Computes in at least fp32."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


# ----------------------------------------------------------------------------------------------------------
# Custom ops: shard-local values (with one shard: the final ones), dispatched to the chosen row backend.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, vocab_start: int,
                       vocab_total: int, ignore_index: int, with_entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [...] fp32, entropy [...] fp32 or [0], lse [...] float64) of this shard; see the module docstring."""
    _checks.token_values(tokens, vocab_total, ignore_index)
    plan = _rows.plan_rows(logits)
    if plan.rows == 0:
        return _fwd_fake(logits, tokens, temperature, vocab_start, vocab_total, ignore_index, with_entropy)
    kern = _backend.kernels(logits.device.type)
    logp, entropy, lse = kern.logprob_fwd(_rows.rows_view(logits, plan), _rows.to_rows(tokens, plan, ignore_index),
                                          1.0 / temperature, vocab_start, ignore_index, with_entropy)
    entropy = _rows.from_rows(entropy, plan) if with_entropy else entropy
    return _rows.from_rows(logp, plan), entropy, _rows.from_rows(lse.double(), plan)  # .double(): see README


@token_logprobs_fwd.register_fake
def _fwd_fake(logits, tokens, temperature, vocab_start, vocab_total, ignore_index, with_entropy):
    out = logits.new_empty(tokens.shape, dtype=torch.float32)
    entropy = torch.empty_like(out) if with_entropy else logits.new_empty(0, dtype=torch.float32)
    return out, entropy, torch.empty_like(out, dtype=torch.float64)


@torch.library.custom_op("opd_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor,
                       grad_entropy: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
                       temperature: float, vocab_start: int, ignore_index: int) -> torch.Tensor:
    """d/dlogits of sum(grad_logp * logp + grad_entropy * entropy), from the GLOBAL lse / entropy."""
    plan = _rows.plan_rows(logits)
    if plan.rows == 0:
        return _rows.empty_grad(logits, plan)
    f32 = lambda t: _rows.to_rows(t.float(), plan, 0.0)  # noqa: E731
    if grad_entropy is None:  # the entropy is not read: pass an empty [0] tensor, as the row contract allows
        entropy = grad_entropy_rows = None
    else:
        grad_entropy_rows, entropy = f32(grad_entropy), f32(entropy)
    kern = _backend.kernels(logits.device.type)
    grad = kern.logprob_bwd(_rows.rows_view(logits, plan), _rows.to_rows(tokens, plan, ignore_index),
                            f32(grad_logp), grad_entropy_rows, _rows.to_rows(lse.double(), plan, 0.0),
                            lse.new_empty(0, dtype=torch.float32) if entropy is None else entropy,
                            1.0 / temperature, vocab_start, ignore_index)
    return _rows.grad_from_rows(grad, plan)


@token_logprobs_bwd.register_fake
def _bwd_fake(logits, tokens, grad_logp, grad_entropy, lse, entropy, temperature, vocab_start, ignore_index):
    return _rows.empty_grad(logits, _rows.plan_rows(logits))


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, vocab_start, _, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.args = (temperature, vocab_start, ignore_index, with_entropy)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy = ctx.saved_tensors
    temperature, vocab_start, ignore_index, with_entropy = ctx.args
    grad = token_logprobs_bwd(logits, tokens, grad_logp, grad_entropy if with_entropy else None, lse, entropy,
                              temperature, vocab_start, ignore_index)
    return grad, None, None, None, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# In-place custom ops: the logits buffer is overwritten with the gradient (mutates_args), no [..., V] output.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("opd_kernels::token_logprobs_fwd_inplace", mutates_args=("logits",))
def token_logprobs_fwd_inplace(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor | None,
                               temperature: float, ignore_index: int, with_entropy: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy or [0], lse float64) over the whole vocabulary, one pass; logits := grad_logp (onehot - p) / T
    (grad_logp None = 1; zeros on ignore rows)."""
    _checks.token_values(tokens, logits.shape[-1], ignore_index)
    plan = _inplace.buffer_plan(logits, "logits")
    if plan.rows == 0:
        return _fwd_fake(logits, tokens, temperature, 0, logits.shape[-1], ignore_index, with_entropy)
    g = None if grad_logp is None else _rows.to_rows(grad_logp.float(), plan, 0.0)
    kern = _inplace.kernel("logprob_fwd_inplace", logits.device.type)
    logp, entropy, lse = kern(_rows.rows_view(logits, plan), _rows.to_rows(tokens, plan, ignore_index), g,
                              1.0 / temperature, 0, ignore_index, with_entropy)
    entropy = _rows.from_rows(entropy, plan) if with_entropy else entropy
    return _rows.from_rows(logp, plan), entropy, _rows.from_rows(lse.double(), plan)


@token_logprobs_fwd_inplace.register_fake
def _fwd_inplace_fake(logits, tokens, grad_logp, temperature, ignore_index, with_entropy):
    return _fwd_fake(logits, tokens, temperature, 0, logits.shape[-1], ignore_index, with_entropy)


@torch.library.custom_op("opd_kernels::token_logprobs_bwd_inplace", mutates_args=("logits",))
def token_logprobs_bwd_inplace(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor,
                               grad_entropy: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
                               temperature: float, vocab_start: int, ignore_index: int) -> None:
    """logits := what ``token_logprobs_bwd`` returns (GLOBAL lse / entropy), written into the buffer."""
    plan = _inplace.buffer_plan(logits, "logits")
    if plan.rows == 0:
        return
    f32 = lambda t: _rows.to_rows(t.float(), plan, 0.0)  # noqa: E731
    kern = _inplace.kernel("logprob_bwd_inplace", logits.device.type)
    kern(_rows.rows_view(logits, plan), _rows.to_rows(tokens, plan, ignore_index), f32(grad_logp),
         None if grad_entropy is None else f32(grad_entropy), _rows.to_rows(lse.double(), plan, 0.0),
         logits.new_empty(0, dtype=torch.float32) if grad_entropy is None else f32(entropy),
         1.0 / temperature, vocab_start, ignore_index)


@token_logprobs_bwd_inplace.register_fake
def _bwd_inplace_fake(logits, tokens, grad_logp, grad_entropy, lse, entropy, temperature, vocab_start, ignore_index):
    return None


class _InplaceTokenLogprobs(torch.autograd.Function):
    """Forward: logits := (onehot - p) / T (under TP: after the all-reduce, a second pass over the shard with the
    global lse). Backward: that buffer scaled by grad_logp per row, in place. The entropy gets no gradient."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, with_entropy, group):
        _inplace.buffer_plan(logits, "logits")  # refuse before anything is written
        if group is None:
            logp, entropy, _ = token_logprobs_fwd_inplace(logits, tokens, None, temperature, ignore_index,
                                                          with_entropy)
        else:
            logp, entropy, lse = sharded_logprobs(logits, tokens, temperature, ignore_index, with_entropy, group)
            token_logprobs_bwd_inplace(logits, tokens, torch.ones_like(logp), None, lse, logp.new_empty(0),
                                       temperature, _tp.shard_range(logits, group)[0], ignore_index)
        _inplace.record(ctx, logits)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        return _inplace.scale_rows_(ctx, "logits", grad_logp), None, None, None, None, None


def logprob_fwd_grad_(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor | None = None, *,
                      temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False):
    """One pass over the WHOLE vocabulary (no TP), no autograd: returns (logp fp32, entropy fp32 or [0],
    lse float64) [...] and overwrites ``logits`` (a buffer you own: see ``_inplace.py``) with
    grad_logp (onehot(token) - p) / T, grad_logp None = 1; zeros on ignore rows."""
    _checks.logits(logits, "logits")
    _checks.tokens(tokens, logits)
    temperature = _checks.positive_scalar(temperature, "temperature")
    if grad_logp is not None:
        grad_logp = _checks.float_values(grad_logp, logits, "grad_logp")
    with torch.no_grad():
        return token_logprobs_fwd_inplace(logits, tokens, grad_logp, temperature,
                                          _checks.integer(ignore_index, "ignore_index"), with_entropy)


def logprob_grad_inplace_(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor, lse: torch.Tensor,
                          *, temperature: float = 1.0, ignore_index: int = -100, grad_entropy=None, entropy=None,
                          vocab_start: int = 0) -> torch.Tensor:
    """No autograd: ``logits`` (this shard's columns, global ids from ``vocab_start``) := d/dlogits of
    sum(grad_logp * logp + grad_entropy * entropy) = (grad_logp (onehot - p) - grad_entropy p (log p + entropy)) / T,
    p = exp(logits / T - lse), from the GLOBAL lse [...] (float64 for full accuracy) and entropy (read only with
    grad_entropy). Returns ``logits``."""
    _checks.logits(logits, "logits")
    _checks.tokens(tokens, logits)
    grad_logp, lse = _checks.float_values(grad_logp, logits, "grad_logp"), _inplace.per_row64(lse, logits, "lse")
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("grad_entropy needs the entropy of the forward (entropy=...)")
        grad_entropy = _checks.float_values(grad_entropy, logits, "grad_entropy")
        entropy = _checks.float_values(entropy, logits, "entropy")
    with torch.no_grad():
        token_logprobs_bwd_inplace(logits, tokens, grad_logp, grad_entropy, lse,
                                   logits.new_empty(0, dtype=torch.float32) if entropy is None else entropy,
                                   _checks.positive_scalar(temperature, "temperature"),
                                   _checks.integer(vocab_start, "vocab_start"),
                                   _checks.integer(ignore_index, "ignore_index"))
    return logits


# ----------------------------------------------------------------------------------------------------------
# Tensor parallel: shard-local custom op + all-reduce of per-row scalars; backward from the global scalars.
# ----------------------------------------------------------------------------------------------------------
def sharded_logprobs(logits, tokens, temperature, ignore_index, with_entropy, group):
    """Global (logp, entropy, lse) from this rank's vocabulary shard (no autograd)."""
    vocab_start, vocab_total = _tp.shard_range(logits, group)
    logp_r, entropy_r, lse_r = token_logprobs_fwd(logits, tokens, temperature, vocab_start, vocab_total,
                                                  ignore_index, with_entropy)
    valid = tokens != ignore_index
    own = _tp.owned(tokens, vocab_start, logits.shape[-1], valid)
    return _tp.combine_logprob(logp_r, entropy_r, lse_r, own, valid, group, with_entropy)


class _ShardedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, with_entropy, group):
        logp, entropy, lse = sharded_logprobs(logits, tokens, temperature, ignore_index, with_entropy, group)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.args = (temperature, _tp.shard_range(logits, group)[0], ignore_index, with_entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        temperature, vocab_start, ignore_index, with_entropy = ctx.args
        grad = token_logprobs_bwd(logits, tokens, grad_logp, grad_entropy if with_entropy else None, lse,
                                  entropy, temperature, vocab_start, ignore_index)
        return grad, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, process_group=None,
                   inplace_backward: bool = False):
    """Log-probability of each token under softmax(logits / temperature), fused over the vocabulary.

    Args:
        logits: [..., V] float32 / bfloat16 / float16, any strides (``logits[:, :-1]`` is not copied). Under
            tensor parallelism: this rank's vocabulary shard [..., V / world], columns
            [rank * V_r, (rank + 1) * V_r).
        tokens: [...] int64 global token ids in [0, V) (checked on CPU; see ``OPD_KERNELS_CHECK_TOKENS``), or
            ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of that distribution per row.
        ignore_index: rows with this token give 0 (log-prob and entropy) and a zero gradient.
        process_group: a torch.distributed group over which the vocabulary is sharded, or None.
        inplace_backward: the caller hands the logits buffer over (a trainer that owns its logits): when a
            gradient is needed, the forward overwrites ``logits`` with the unit-upstream gradient during its one
            pass (under TP: after the all-reduce, in a second pass over the shard) and the backward scales it in
            place and returns that same storage. Fwd + bwd read the logits once and allocate nothing of size
            [..., V]. ``logits`` must be a buffer with rows at one stride (any contiguous tensor; ValueError
            otherwise), must not be read or modified afterwards (RuntimeError in the backward if modified), and the
            entropy returned then has no gradient (train on it with the default mode). When no gradient is
            needed (no_grad, or logits not requiring grad), nothing is written.

    Returns:
        logp [...] float32, or (logp, entropy) when ``return_entropy``; differentiable w.r.t. ``logits``.
    """
    _checks.logits(logits, "logits")
    _checks.tokens(tokens, logits)
    temperature = _checks.positive_scalar(temperature, "temperature")
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        logp, entropy = _InplaceTokenLogprobs.apply(logits, tokens, temperature, ignore_index, return_entropy,
                                                    process_group)
    elif process_group is None:
        logp, entropy, _ = token_logprobs_fwd(logits, tokens, temperature, 0, logits.shape[-1], ignore_index,
                                              return_entropy)
    else:
        logp, entropy = _ShardedTokenLogprobs.apply(logits, tokens, temperature, ignore_index, return_entropy,
                                                    process_group)
    return (logp, entropy) if return_entropy else logp
