"""The ``torch`` row backend: the row-kernel contract (``opd_kernels/ops/README.md``) in plain PyTorch.

Row-chunked so that the fp32 temporaries stay ~4 MiB whatever the number of rows (a whole [N, V] fp32 copy
of bf16 logits at N=8192, V=151936 would be 5 GB). This is the fallback on machines without the compiled
library and the "row-chunked torch" benchmark baseline; the float64 oracle is ``ops/*_reference``.
Numerics are those of PyTorch's ``log_softmax`` (log p = (z - m) - log sum e^(z - m), m = row max), so a
confident row's log-probability keeps its relative accuracy instead of inheriting an error of eps * |lse|; the
per-row scalars that feed a backward (lse, KL) are float64 and the KL is measured from the teacher's value at
the student's argmax, as in the C++ kernels (csrc/cpu/softmax.h explains why). Columns with ``z = -inf`` have
p = 0 and contribute nothing (p * log p := 0); a NaN or +inf logit makes the row NaN.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 20  # fp32 elements per temporary (4 MiB)


def _chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _scaled(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    z = x.float()
    return z * inv_temperature if inv_temperature != 1.0 else z


def _max_relative(z: torch.Tensor):
    """(zm = z - m [c, V], e = exp(zm) [c, V], s = sum e [c], m [c]) with m the row max (0 for an all -inf row)."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    zm = z - m
    e = torch.exp(zm)
    return zm, e, e.sum(-1), m.squeeze(-1)


def _log_softmax(z: torch.Tensor):
    """(log p [c, V], lse = m + log s [c] in float64)."""
    zm, _, s, m = _max_relative(z)
    log_s = torch.log(s)
    return zm - log_s.unsqueeze(-1), m.double() + log_s.double()


def _minus_lse(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p = z - lse with the float64 lse split into fp32 hi + lo: z - hi is exact near the row max, so a
    confident row's p ~ 1 (and 1 - p) keeps its accuracy."""
    hi = lse.float()
    lo = (lse - hi.double()).float()
    return (z - hi.unsqueeze(-1)) - lo.unsqueeze(-1)


def _plogp_sum(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """sum_v p_v * log_p_v with the p == 0 terms dropped (log_p may be -inf there); NaN stays NaN."""
    return torch.where(p != 0, p * log_p, torch.zeros_like(p)).sum(-1)


def _local_token(tokens, vocab_start: int, vocab: int, ignore_index: int):
    """(owned, column): rows whose token lies in this shard, and its local column (0 elsewhere)."""
    col = tokens - vocab_start
    owned = (tokens != ignore_index) & (col >= 0) & (col < vocab)
    return owned, torch.where(owned, col, torch.zeros_like(col))


def _token_logp(log_p, tokens, vocab_start, ignore_index):
    owned, col = _local_token(tokens, vocab_start, log_p.shape[-1], ignore_index)
    picked = log_p.gather(-1, col.unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked, torch.zeros_like(picked))


def logprob_fwd(x, tokens, inv_temperature: float, vocab_start: int, ignore_index: int, with_entropy: bool):
    n, vocab = x.shape
    logp = x.new_zeros(n, dtype=torch.float32)
    lse = x.new_zeros(n, dtype=torch.float64)
    entropy = x.new_zeros(n if with_entropy else 0, dtype=torch.float32)
    for rows in _chunks(n, vocab):
        log_p, lse[rows] = _log_softmax(_scaled(x[rows], inv_temperature))  # (c, V)
        logp[rows] = _token_logp(log_p, tokens[rows], vocab_start, ignore_index)
        if with_entropy:
            h = -_plogp_sum(torch.exp(log_p), log_p)
            entropy[rows] = torch.where(tokens[rows] != ignore_index, h, torch.zeros_like(h))
    return logp, entropy, lse


def logprob_bwd(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature: float, vocab_start: int,
                ignore_index: int):
    n, vocab = x.shape
    grad = torch.empty((n, vocab), dtype=x.dtype, device=x.device)
    for rows in _chunks(n, vocab):
        logp_all = _minus_lse(_scaled(x[rows], inv_temperature), lse[rows])  # (c, V)
        p = torch.exp(logp_all)
        g_lp = grad_logp[rows].unsqueeze(-1)
        g = -g_lp * p
        owned, col = _local_token(tokens[rows], vocab_start, vocab, ignore_index)
        g.scatter_add_(-1, col.unsqueeze(-1), torch.where(owned.unsqueeze(-1), g_lp, torch.zeros_like(g_lp)))
        if grad_entropy is not None:
            term = torch.where(p != 0, p * (logp_all + entropy[rows].unsqueeze(-1)), torch.zeros_like(p))
            g = g - grad_entropy[rows].unsqueeze(-1) * term
        keep = (tokens[rows] != ignore_index).unsqueeze(-1)
        grad[rows] = torch.where(keep, g * inv_temperature, torch.zeros_like(g))
    return grad


def kl_fwd(student, teacher, tokens, inv_temperature: float, vocab_start: int, ignore_index: int):
    n, vocab = student.shape
    kl, lse_s, lse_t = (student.new_zeros(n, dtype=torch.float64) for _ in range(3))
    logp = student.new_zeros(n if tokens is not None else 0, dtype=torch.float32)
    for rows in _chunks(n, vocab):
        zs, zt = _scaled(student[rows], inv_temperature), _scaled(teacher[rows], inv_temperature)  # (c, V)
        zms, es, ss, ms = _max_relative(zs)
        _, _, st, mt = _max_relative(zt)
        log_ss, log_st = torch.log(ss.double()), torch.log(st.double())
        lse_s[rows], lse_t[rows] = ms.double() + log_ss, mt.double() + log_st
        # KL = sum e_s ((zs - ms) - (zt - r)) / s_s - log s_s + lse_t - r, r = zt at the student's argmax: the
        # dominant term of a confident student is exactly 0, and the row constants enter once, in float64 (see
        # csrc/cpu/softmax.h: the backward needs KL to better than ulp(|lse|))
        r = zt.gather(-1, zs.argmax(-1, keepdim=True))
        r = torch.where(r == float("-inf"), torch.zeros_like(r), r)
        a = _plogp_sum(es, zms - (zt - r)).double()
        kl[rows] = a / ss.double() - log_ss + (lse_t[rows] - r.squeeze(-1).double())
        if tokens is not None:
            log_ps = zms - log_ss.float().unsqueeze(-1)
            logp[rows] = _token_logp(log_ps, tokens[rows], vocab_start, ignore_index)
    return kl, lse_s, lse_t, logp


def kl_bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature: float):
    n, vocab = student.shape
    grad = torch.empty((n, vocab), dtype=student.dtype, device=student.device)
    for rows in _chunks(n, vocab):
        zs, zt = _scaled(student[rows], inv_temperature), _scaled(teacher[rows], inv_temperature)  # (c, V)
        ps = torch.exp(_minus_lse(zs, lse_s[rows]))
        # log p_s - log p_t - KL = (zs - zt) - (KL + lse_s - lse_t), in float64: where the student is confident
        # and the teacher is not, both parts are ~|lse| and their difference is small (see csrc/cpu/kl.cpp)
        const = (kl[rows] + lse_s[rows] - lse_t[rows]).unsqueeze(-1)
        u = ((zs.double() - zt.double()) - const).float()
        term = torch.where(ps != 0, ps * u, torch.zeros_like(ps))
        g_kl = grad_kl[rows].unsqueeze(-1)
        # rows with a zero upstream gradient (masked rows) get exact zeros, even when their logits are NaN
        grad[rows] = torch.where(g_kl != 0, (g_kl * inv_temperature) * term, torch.zeros_like(term))
    return grad


# In-place forms (the buffer x is overwritten with the gradient): chunk by chunk, so a chunk is re-read from cache
# and the temporaries stay ~4 MiB (nothing of size [N, V] is allocated).
def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32, device=like.device)


def logprob_fwd_inplace(x, tokens, grad_logp, inv_temperature: float, vocab_start: int, ignore_index: int,
                        with_entropy: bool):
    n, vocab = x.shape
    grad_logp = _ones(n, x) if grad_logp is None else grad_logp
    logp = x.new_zeros(n, dtype=torch.float32)
    lse = x.new_zeros(n, dtype=torch.float64)
    entropy = x.new_zeros(n if with_entropy else 0, dtype=torch.float32)
    no_entropy = x.new_zeros(0, dtype=torch.float32)
    for rows in _chunks(n, vocab):
        logp[rows], h, lse[rows] = logprob_fwd(x[rows], tokens[rows], inv_temperature, vocab_start, ignore_index,
                                               with_entropy)
        if with_entropy:
            entropy[rows] = h
        x[rows] = logprob_bwd(x[rows], tokens[rows], grad_logp[rows], None, lse[rows], no_entropy,
                              inv_temperature, vocab_start, ignore_index)
    return logp, entropy, lse


def logprob_bwd_inplace(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature: float,
                        vocab_start: int, ignore_index: int) -> None:
    for rows in _chunks(*x.shape):
        x[rows] = logprob_bwd(x[rows], tokens[rows], grad_logp[rows],
                              None if grad_entropy is None else grad_entropy[rows], lse[rows],
                              entropy if grad_entropy is None else entropy[rows], inv_temperature, vocab_start,
                              ignore_index)


def kl_fwd_inplace(student, teacher, grad_kl, inv_temperature: float):
    n, vocab = student.shape
    grad_kl = _ones(n, student) if grad_kl is None else grad_kl
    kl, lse_s, lse_t = (student.new_zeros(n, dtype=torch.float64) for _ in range(3))
    for rows in _chunks(n, vocab):
        kl[rows], lse_s[rows], lse_t[rows], _ = kl_fwd(student[rows], teacher[rows], None, inv_temperature, 0, -100)
        student[rows] = kl_bwd(student[rows], teacher[rows], grad_kl[rows], lse_s[rows], lse_t[rows], kl[rows],
                               inv_temperature)
    return kl, lse_s, lse_t


def kl_bwd_inplace(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature: float) -> None:
    for rows in _chunks(*student.shape):
        student[rows] = kl_bwd(student[rows], teacher[rows], grad_kl[rows], lse_s[rows], lse_t[rows], kl[rows],
                               inv_temperature)
