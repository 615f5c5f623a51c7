"""Triton row kernels: log p(token | x / T) (+ entropy) per row, and the backward from the saved log-sum-exp.

Design note (Hopper, memory-bound; see _common.py for the numerics):
- Forward, many rows (N >= 4 programs per SM): grid (N,), one program streams its row once in BLOCK_V-column
  blocks (8 KiB each, 128-bit loads, evict-first since nothing re-reads the logits), keeping a scalar online
  softmax state (m, c, r[, b]) in registers: bytes moved = N*V*elt (+16 B per row). The sampled token's logit is
  one extra scalar load. At T=8192, V=151936 bf16 that is 2.49 GB: the kernel should run at copy bandwidth.
- Forward, few rows: grid (N, S); program (r, s) streams columns [s*chunk, (s+1)*chunk) of row r and writes
  its state (m, c, r, b) to a [N, S, 4] fp32 workspace; a combine kernel (grid (N,)) merges the S states and
  finishes the row. Two launches, but every SM streams even when N is 1.
- Backward: purely elementwise once the global lse (and entropy) are known, so grid (N, ceil(V / BLOCK_V)):
  no loop, no reduction, one read of x and one write of grad_x (2 * N*V*elt bytes). Ignored rows (token ==
  ignore_index, e.g. padding or the LM-shift gap rows) are not read in either direction.
Temperature is a compile-time constant (INV_T), offsets are int64, the vocabulary tail is masked
(loaded as -inf, so it adds exactly 0 to every sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (EXACT, block_config, check_device, check_rows, check_vocab, check_writable, checked_inv_t, device_ctx, fold_mass,
                      is_top, log_mass, lse_out, merge_parts, rescale, row_vector, safe_max, split_block,
                      split_config, split_lse, sums2, sums3, to_output_dtype, token_logit)

PARTS: tl.constexpr = tl.constexpr(4)  # floats per partial state of the split path: m, c, r, b


@triton.jit
def _logprob_stats(x_row, lo, hi, INV_T: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online softmax over columns [lo, hi) of one row of z = x * inv_t: (m, c, r, b), b = 0 unless WITH_ENTROPY."""
    m = tl.full((), float("-inf"), tl.float32)
    c = tl.zeros((), tl.float32)
    r = tl.zeros((), tl.float32)
    b = tl.zeros((), tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < hi, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32) * INV_T
        m_new = tl.maximum(m, tl.max(z, 0))
        ref = safe_max(m_new)
        e = tl.exp(z - ref)
        top = is_top(z, m_new)
        if WITH_ENTROPY:
            c_blk, r_blk, b_blk = sums3(top.to(tl.float32), tl.where(top, 0.0, e), tl.where(e == 0, 0.0, e * (z - ref)))
            # b is relative to the running max: moving it by (m - ref) shifts every earlier term by that much
            b = rescale(m, m_new) * (b + (safe_max(m) - ref) * (c + r)) + b_blk
        else:
            c_blk, r_blk = sums2(top.to(tl.float32), tl.where(top, 0.0, e))
        c, r = fold_mass(m, c, r, m_new)
        c += c_blk
        r += r_blk
        m = m_new
    return m, c, r, b


@triton.jit
def _logprob_finish(x_row, tok_ptr, logp_ptr, ent_ptr, lse_ptr, row, m, c, r, b, V, vocab_start, ignore_index,
                    INV_T: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    log_d = log_mass(c, r)
    in_shard, valid, x_tok = token_logit(x_row, tok_ptr, row, V, vocab_start, ignore_index)
    tl.store(lse_ptr + row, tl.where(valid, lse_out(m, log_d), 0.0))  # ignored rows were not read: unspecified
    tl.store(logp_ptr + row, tl.where(in_shard, (x_tok * INV_T - m) - log_d, 0.0))
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_d - b / (c + r), 0.0))


@triton.jit
def _logprob_fwd_kernel(x_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr, part_ptr,
                        V, stride_r, vocab_start, ignore_index, chunk,
                        INV_T: tl.constexpr, WITH_ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_r
    n_cols = tl.where(tl.load(tok_ptr + row) != ignore_index, V, 0)  # ignored rows are not read
    if SPLIT:
        s = tl.program_id(1)
        lo = s * chunk
        m, c, r, b = _logprob_stats(x_row, lo, tl.minimum(lo + chunk, n_cols), INV_T, WITH_ENTROPY, BLOCK_V)
        part = part_ptr + (row * tl.num_programs(1) + s) * PARTS
        tl.store(part, m)
        tl.store(part + 1, c)
        tl.store(part + 2, r)
        tl.store(part + 3, b)
    else:
        m, c, r, b = _logprob_stats(x_row, 0, n_cols, INV_T, WITH_ENTROPY, BLOCK_V)
        _logprob_finish(x_row, tok_ptr, logp_ptr, ent_ptr, lse_ptr, row, m, c, r, b, V, vocab_start, ignore_index,
                        INV_T, WITH_ENTROPY)


@triton.jit
def _logprob_combine_kernel(x_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr, part_ptr, n_split,
                            V, stride_r, vocab_start, ignore_index,
                            INV_T: tl.constexpr, WITH_ENTROPY: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Merges the n_split partial states of one row (same algebra as one online-softmax step) and finishes it."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, SPLIT_BLOCK)
    part = part_ptr + (row * n_split + offs) * PARTS
    ok = offs < n_split
    m_i = tl.load(part, mask=ok, other=float("-inf"))
    c_i = tl.load(part + 1, mask=ok, other=0.0)
    r_i = tl.load(part + 2, mask=ok, other=0.0)
    b_i = tl.load(part + 3, mask=ok, other=0.0)
    m, c, r, scale = merge_parts(m_i, c_i, r_i)
    b = tl.sum(tl.where(scale > 0, scale * (b_i + (m_i - safe_max(m)) * (c_i + r_i)), 0.0), 0)
    x_row = x_ptr + row * stride_r
    _logprob_finish(x_row, tok_ptr, logp_ptr, ent_ptr, lse_ptr, row, m, c, r, b, V, vocab_start, ignore_index,
                    INV_T, WITH_ENTROPY)


@triton.jit
def _logprob_bwd_kernel(x_ptr, tok_ptr, glogp_ptr, gent_ptr, lse_ptr, ent_ptr, out_ptr,
                        V, stride_r, stride_o, vocab_start, ignore_index,
                        INV_T: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    """grad_x = inv_t * (g * (onehot - p) - g_H * p * (log p + H)), p = exp(x inv_t - lse); 0 on ignored rows.
    out_ptr may be x_ptr (stride_o = stride_r: the in-place form): each program reads its block before writing it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    x_row = x_ptr + row * stride_r
    tok = tl.load(tok_ptr + row)
    valid = tok != ignore_index
    lse_hi, lse_lo = split_lse(lse_ptr, row)
    g = tl.load(glogp_ptr + row).to(tl.float32)
    ignored_or_tail = cols >= tl.where(valid, V, 0)  # ignored rows are not read
    z = tl.load(x_row + cols, mask=~ignored_or_tail, other=float("-inf")).to(tl.float32) * INV_T
    logp = (z - lse_hi) - lse_lo
    p = tl.exp(logp)
    # (onehot - p) in fp32: the target's 1 - p keeps its precision for confident rows.
    grad = g * (tl.where(cols == tok - vocab_start, 1.0, 0.0) - p)
    if HAS_ENTROPY:
        g_h = tl.load(gent_ptr + row).to(tl.float32)
        ent = tl.load(ent_ptr + row).to(tl.float32)
        grad -= g_h * tl.where(p == 0, 0.0, p * (logp + ent))
    grad = tl.where(valid, grad * INV_T, 0.0)
    tl.store(out_ptr + row * stride_o + cols, to_output_dtype(grad, out_ptr), mask=ok)


def _fwd(x, tokens, inv_t, vocab_start, ignore_index, with_entropy, split=None):
    check_device(x)
    N, V, sr = check_rows(x, "logits")
    check_vocab(N, V, "logits")
    tokens = row_vector(tokens, N, x.device, "tokens", integer=True)
    inv_t = checked_inv_t(inv_t)
    logp = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty(N, device=x.device, dtype=torch.float64)
    ent = torch.empty(N if with_entropy else 0, device=x.device, dtype=torch.float32)
    if N == 0:
        return logp, ent, lse
    block_v, warps = block_config(x)
    n_split, chunk = split_config(x, N, V, block_v, split)
    common = dict(V=V, stride_r=sr, vocab_start=int(vocab_start),
                  ignore_index=int(ignore_index), INV_T=inv_t, WITH_ENTROPY=bool(with_entropy))
    ent_arg = ent if with_entropy else logp  # never touched when WITH_ENTROPY is False
    with device_ctx(x):
        if n_split == 1:
            _logprob_fwd_kernel[(N, 1)](x, tokens, logp, ent_arg, lse, lse, chunk=chunk, SPLIT=False,
                                        BLOCK_V=block_v, num_warps=warps, **EXACT, **common)
        else:
            part = torch.empty(N, n_split, PARTS.value, device=x.device, dtype=torch.float32)
            _logprob_fwd_kernel[(N, n_split)](x, tokens, logp, ent_arg, lse, part, chunk=chunk, SPLIT=True,
                                              BLOCK_V=block_v, num_warps=warps, **EXACT, **common)
            _logprob_combine_kernel[(N,)](x, tokens, logp, ent_arg, lse, part, n_split,
                                          SPLIT_BLOCK=split_block(n_split), num_warps=1, **EXACT, **common)
    return logp, ent, lse


def logprob_fwd(logits: torch.Tensor, tokens: torch.Tensor, inv_temperature: float, vocab_start: int,
                ignore_index: int, with_entropy: bool):
    """Shard-local (logp, entropy, lse): fp32 [N], fp32 [N] (an empty [0] tensor unless with_entropy), float64 [N].

    logits [N, V] fp32/bf16/fp16, unit vocabulary stride; tokens [N] int64 global ids.
    lse = logsumexp(x * inv_t) over the shard (0 on ignored rows, which are not read); logp =
    x[tok - vocab_start] * inv_t - lse when the shard owns the token and tok != ignore_index, else 0; entropy of
    the shard softmax (0 on ignored rows).
    """
    return _fwd(logits, tokens, inv_temperature, vocab_start, ignore_index, with_entropy)


def logprob_bwd(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
                inv_temperature: float, vocab_start: int, ignore_index: int) -> torch.Tensor:
    """grad_x (dtype and shape of logits, contiguous) of sum(grad_logp * logp + grad_entropy * entropy), from the
    GLOBAL lse (float64 [N]; fp32 works, less exactly) / entropy (fp32 [N]; may be an empty tensor when
    grad_entropy is None)."""
    return _bwd(logits, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index,
                None)


def logprob_bwd_inplace(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor,
                        grad_entropy: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor,
                        inv_temperature: float, vocab_start: int, ignore_index: int) -> None:
    """logprob_bwd written into the logits' own rows (they must not overlap): no [N, V] allocation."""
    check_writable(logits, "logits")
    _bwd(logits, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index, logits)


def logprob_fwd_inplace(logits: torch.Tensor, tokens: torch.Tensor, grad_logp: torch.Tensor | None,
                        inv_temperature: float, vocab_start: int, ignore_index: int, with_entropy: bool):
    """logprob_fwd, then the logits overwritten with grad_logp * inv_t * (onehot - p) (grad_logp None = 1) from the
    shard's own lse. Two launches (the forward, then the elementwise backward into the buffer): the second
    re-reads the rows, from L2 only when they are still there; a fused one-program-per-row kernel would keep
    that to one HBM read (not done: no GPU to measure it on)."""
    check_writable(logits, "logits")
    logp, ent, lse = _fwd(logits, tokens, inv_temperature, vocab_start, ignore_index, with_entropy)
    if grad_logp is None:
        grad_logp = torch.ones(logits.shape[0], device=logits.device, dtype=torch.float32)
    _bwd(logits, tokens, grad_logp, None, lse, lse, inv_temperature, vocab_start, ignore_index, logits)
    return logp, ent, lse


def _bwd(logits, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index, out):
    check_device(logits)
    N, V, sr = check_rows(logits, "logits")
    check_vocab(N, V, "logits")
    dev = logits.device
    tokens = row_vector(tokens, N, dev, "tokens", integer=True)
    grad_logp = row_vector(grad_logp, N, dev, "grad_logp")
    lse = row_vector(lse, N, dev, "lse")
    has_ent = grad_entropy is not None
    grad_entropy = row_vector(grad_entropy, N, dev, "grad_entropy")
    entropy = row_vector(entropy, N, dev, "entropy") if has_ent else lse
    out = torch.empty(logits.shape, device=dev, dtype=logits.dtype) if out is None else out
    if out.numel() == 0:
        return out
    block_v, warps = block_config(logits)
    with device_ctx(logits):
        _logprob_bwd_kernel[(N, triton.cdiv(V, block_v))](
            logits, tokens, grad_logp, grad_entropy if has_ent else lse, lse, entropy, out,
            V, sr, out.stride(0), int(vocab_start), int(ignore_index), INV_T=checked_inv_t(inv_temperature), HAS_ENTROPY=has_ent,
            BLOCK_V=block_v, num_warps=warps, **EXACT)
    return out
