"""Tensor-parallel vocabulary: combining shard-local row results with all-reduces of per-row scalars.

The scalars are combined in float64 (lse is float64 already: see ops/README.md); results are cast to fp32.
Rank r holds columns [r * V_r, (r + 1) * V_r) of the vocabulary (equal shards, Megatron's layout). The row kernels
return shard-local values (normalised over the shard). With M = max_r lse_r, e_r = exp(lse_r - M), S = sum_r e_r:
  lse     = M + log S                         w_r = e_r / S = the shard's share of the probability mass
  logp    = logp_r + lse_r - lse              on the rank that owns the token (a SUM where others give 0)
  entropy = sum_r w_r (H_r - log w_r)         (chain rule of entropy over the partition into shards)
  KL      = sum_r w_r kl_r + KL(w || u)       u_r = the teacher's shard shares
The last two forms add terms of size O(log world) to the shards' own values instead of subtracting numbers of
size |lse|, so near-identical student/teacher pairs keep their accuracy. Each op costs one MAX and one SUM
all-reduce of a few [N] float64 vectors; logits are never gathered. The backward needs no communication: every
rank gets the same upstream gradient of the replicated result and applies the row backward with the global
scalars.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def shard_range(logits: torch.Tensor, group) -> tuple[int, int]:
    """(vocab_start, vocab_total) of this rank's shard ``logits [..., V_r]``."""
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    vocab = logits.shape[-1]
    return rank * vocab, world * vocab


def owned(tokens: torch.Tensor, vocab_start: int, vocab: int, valid: torch.Tensor) -> torch.Tensor:
    return valid & (tokens >= vocab_start) & (tokens < vocab_start + vocab)


def _weighted(share: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """share * value with 0 where the share is 0 (an empty shard's value may be NaN or infinite)."""
    return torch.where(share > 0, share * value, torch.zeros_like(value))


def _max_then_shares(lse_r: torch.Tensor, group):
    """(M - the max over ranks, e_r = exp(lse_r - M)); lse_r may be stacked [k, N]."""
    top = lse_r.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return top, torch.exp(lse_r - top)


def combine_logprob(logp_r, entropy_r, lse_r, own, valid, group, with_entropy: bool):
    """Global (logp, entropy, lse) [N] from this rank's shard-local values; 0 on invalid rows."""
    top, share = _max_then_shares(lse_r, group)
    parts = [share, torch.where(own, logp_r + (lse_r - top), torch.zeros_like(logp_r))]
    if with_entropy:
        # a shard holding no mass (all its logits -inf: masked or padded columns) adds nothing; its local entropy
        # and log-share are NaN / -inf, and 0 * -inf would poison the sum
        parts.append(_weighted(share, entropy_r - (lse_r - top)))
    sums = torch.stack(parts)  # (2 or 3, N)
    dist.all_reduce(sums, group=group)
    log_total = torch.log(sums[0])
    zero = torch.zeros_like(log_total)
    logp = torch.where(valid, sums[1] - log_total, zero).float()
    entropy = torch.where(valid, sums[2] / sums[0] + log_total, zero).float() if with_entropy else entropy_r
    return logp, entropy, top + log_total


def combine_kl(kl_r, lse_s_r, lse_t_r, logp_r, own, valid, group):
    """Global (kl float64, lse_s, lse_t float64, logp_s fp32) [N]; logp_s only when ``own`` is given (0 on
    invalid rows)."""
    top, share = _max_then_shares(torch.stack([lse_s_r, lse_t_r]), group)  # (2, N)
    rel_s, rel_t = lse_s_r - top[0], lse_t_r - top[1]
    parts = [share[0], share[1], _weighted(share[0], kl_r + rel_s - rel_t)]
    if own is not None:
        parts.append(torch.where(own, logp_r + rel_s, torch.zeros_like(logp_r)))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=group)
    log_s, log_t = torch.log(sums[0]), torch.log(sums[1])
    kl = sums[2] / sums[0] - log_s + log_t  # float64, like the lse (what the backward needs)
    logp = logp_r if own is None else torch.where(valid, sums[3] - log_s, torch.zeros_like(log_s)).float()
    return kl, top[0] + log_s, top[1] + log_t, logp
