"""The ``torch`` row backend: the row-kernel contract (``opd_kernels/ops/README.md``) in plain PyTorch.

Row-chunked so that the fp32 temporaries stay ~8 MiB whatever the number of rows (a whole [N, V] fp32 copy
of bf16 logits at N=8192, V=151936 would be 5 GB). This is the fallback on machines without the compiled
library and the "row-chunked torch" benchmark baseline; the float64 oracle is ``ops/*_reference``.

Numerics match the compiled kernels: everything is relative to the row max ``m`` (s = sum exp(z - m),
lse = m + log s), and the entropy / KL are formed from max-relative terms (``H = log s - sum e (z - m) / s``)
instead of ``lse - sum p z``, which would cancel two numbers of size |lse| for confident rows. Columns with
``z = -inf`` have p = 0 and contribute nothing (p * log p := 0); NaN or +inf logits make the row NaN.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 21  # fp32 elements per temporary (8 MiB)


def _chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _max_relative(z: torch.Tensor):
    """(m, z - m, e = exp(z - m), s = sum e) per row; an all -inf row gets m = 0 so that e = 0, not NaN."""
    m = z.amax(-1, keepdim=True)  # (c, 1)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    zm = z - m  # (c, V)
    e = torch.exp(zm)
    return m.squeeze(-1), zm, e, e.sum(-1)


def _xlogx_sum(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_v e_v * y_v, with terms where e == 0 dropped (y may be -inf there)."""
    return torch.where(e > 0, e * y, torch.zeros_like(e)).sum(-1)


def _local_token(tokens, vocab_start: int, vocab: int, ignore_index: int):
    """(owned, column): rows whose token lies in this shard, and its local column (0 elsewhere)."""
    col = tokens - vocab_start
    owned = (tokens != ignore_index) & (col >= 0) & (col < vocab)
    return owned, torch.where(owned, col, torch.zeros_like(col))


def _token_logp(z, lse, tokens, vocab_start, ignore_index):
    owned, col = _local_token(tokens, vocab_start, z.shape[-1], ignore_index)
    picked = z.gather(-1, col.unsqueeze(-1)).squeeze(-1) - lse
    return torch.where(owned, picked, torch.zeros_like(picked))


def logprob_fwd(x, tokens, inv_temperature: float, vocab_start: int, ignore_index: int, with_entropy: bool):
    n, vocab = x.shape
    logp = x.new_zeros(n, dtype=torch.float32)
    lse = x.new_zeros(n, dtype=torch.float32)
    entropy = x.new_zeros(n if with_entropy else 0, dtype=torch.float32)
    for rows in _chunks(n, vocab):
        z = x[rows].float() * inv_temperature  # (c, V)
        m, zm, e, s = _max_relative(z)
        log_s = torch.log(s)
        lse[rows] = m + log_s
        logp[rows] = _token_logp(z, lse[rows], tokens[rows], vocab_start, ignore_index)
        if with_entropy:
            h = log_s - _xlogx_sum(e, zm) / s
            entropy[rows] = torch.where(tokens[rows] != ignore_index, h, torch.zeros_like(h))
    return logp, entropy, lse


def logprob_bwd(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature: float, vocab_start: int,
                ignore_index: int):
    n, vocab = x.shape
    grad = torch.empty((n, vocab), dtype=x.dtype, device=x.device)
    for rows in _chunks(n, vocab):
        logp_all = x[rows].float() * inv_temperature - lse[rows].unsqueeze(-1)  # (c, V)
        p = torch.exp(logp_all)
        g_lp = grad_logp[rows].unsqueeze(-1)
        g = -g_lp * p
        owned, col = _local_token(tokens[rows], vocab_start, vocab, ignore_index)
        g.scatter_add_(-1, col.unsqueeze(-1), torch.where(owned.unsqueeze(-1), g_lp, torch.zeros_like(g_lp)))
        if grad_entropy is not None:
            term = torch.where(p > 0, p * (logp_all + entropy[rows].unsqueeze(-1)), torch.zeros_like(p))
            g = g - grad_entropy[rows].unsqueeze(-1) * term
        keep = (tokens[rows] != ignore_index).unsqueeze(-1)
        grad[rows] = torch.where(keep, g * inv_temperature, torch.zeros_like(g))
    return grad


def kl_fwd(student, teacher, tokens, inv_temperature: float, vocab_start: int, ignore_index: int):
    n, vocab = student.shape
    kl = student.new_zeros(n, dtype=torch.float32)
    lse_s, lse_t = torch.zeros_like(kl), torch.zeros_like(kl)
    logp = student.new_zeros(n if tokens is not None else 0, dtype=torch.float32)
    for rows in _chunks(n, vocab):
        zs = student[rows].float() * inv_temperature
        ms, zms, es, ss = _max_relative(zs)
        mt, zmt, _, st = _max_relative(teacher[rows].float() * inv_temperature)
        # KL = sum p_s ((zs - ms) - (zt - mt)) - log ss + log st: every term is O(log V), nothing of size |lse|
        kl[rows] = _xlogx_sum(es, zms - zmt) / ss - torch.log(ss) + torch.log(st)
        lse_s[rows] = ms + torch.log(ss)
        lse_t[rows] = mt + torch.log(st)
        if tokens is not None:
            logp[rows] = _token_logp(zs, lse_s[rows], tokens[rows], vocab_start, ignore_index)
    return kl, lse_s, lse_t, logp


def kl_bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature: float):
    n, vocab = student.shape
    grad = torch.empty((n, vocab), dtype=student.dtype, device=student.device)
    for rows in _chunks(n, vocab):
        log_ps = student[rows].float() * inv_temperature - lse_s[rows].unsqueeze(-1)  # (c, V)
        log_pt = teacher[rows].float() * inv_temperature - lse_t[rows].unsqueeze(-1)
        ps = torch.exp(log_ps)
        term = torch.where(ps > 0, ps * (log_ps - log_pt - kl[rows].unsqueeze(-1)), torch.zeros_like(ps))
        g_kl = grad_kl[rows].unsqueeze(-1)
        # rows with a zero upstream gradient (masked rows) get exact zeros, even when their logits are NaN
        grad[rows] = torch.where(g_kl != 0, (g_kl * inv_temperature) * term, torch.zeros_like(term))
    return grad
