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
"""
from __future__ import annotations

import torch

from .. import _backend
from . import _checks, _rows, _tp


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
                   return_entropy: bool = False, ignore_index: int = -100, process_group=None):
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

    Returns:
        logp [...] float32, or (logp, entropy) when ``return_entropy``; differentiable w.r.t. ``logits``.
    """
    _checks.logits(logits, "logits")
    _checks.tokens(tokens, logits)
    temperature = _checks.positive_scalar(temperature, "temperature")
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    if process_group is None:
        logp, entropy, _ = token_logprobs_fwd(logits, tokens, temperature, 0, logits.shape[-1], ignore_index,
                                              return_entropy)
    else:
        logp, entropy = _ShardedTokenLogprobs.apply(logits, tokens, temperature, ignore_index, return_entropy,
                                                    process_group)
    return (logp, entropy) if return_entropy else logp
