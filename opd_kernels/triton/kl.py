"""Triton row kernels: exact KL(p_S || p_T) per row in one pass over both logit rows, and its backward.

Design note (Hopper, memory-bound; numerics in _common.py):
- Forward: grid (N,) (or (N, S) + a combine kernel when rows are few, as in logprob.py). Each program streams its
  student AND teacher rows together in BLOCK_V-column blocks, keeping both online-softmax states (ms, cs, rs),
  (mt, ct, rt) in fp32 and the KL accumulator a in float64 (scalar double math once per block) in registers:
  one read of each row, 2 exp + a TwoSum per column pair, 3 block reductions per iteration (the two maxima and
  one 7-operand sum). Bytes moved:
  N*V*(elt_s + elt_t) + 16 B per row, i.e. the KL costs the same as reading both logit matrices once.
  The sampled token's student log-prob (when tokens is given) is one extra scalar load.
- Backward: elementwise from the GLOBAL float64 (lse_s, lse_t, kl): grid (N, ceil(V / BLOCK_V)), reads both rows
  once, writes grad_xs once; no loop, no reduction. u = (zs - zt) - C, zs - zt exact (TwoSum), C = kl + lse_s -
  lse_t split hi + lo (opd_kernels/ops/README.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (EXACT, block_config, check_device, check_rows, check_same_rows, check_vocab, check_writable,
                      checked_inv_t,
                      device_ctx, fold_mass, is_top, kl_value, log_mass, lse_out, merge_parts, rescale, row_vector,
                      safe_max, split_block, split_config, split_lse, sums7, to_output_dtype, token_logit, two_diff)

PARTS: tl.constexpr = tl.constexpr(7)  # float64s per partial state of the split path: ms, cs, rs, mt, ct, rt, a


@triton.jit
def _kl_stats(s_row, t_row, lo, hi, INV_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online state over columns [lo, hi) of one student/teacher row pair, z = x * inv_t: (ms, cs, rs) and
    (mt, ct, rt) as in _common, a = sum exp(zs - ms) ((zs - zt) - (ms - mt)) in float64."""
    ms = tl.full((), float("-inf"), tl.float32)
    mt = tl.full((), float("-inf"), tl.float32)
    cs = tl.zeros((), tl.float32)
    rs = tl.zeros((), tl.float32)
    ct = tl.zeros((), tl.float32)
    rt = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float64)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < hi
        ys = tl.load(s_row + cols, mask=ok, other=float("-inf"), eviction_policy="evict_first").to(tl.float32) * INV_T
        yt = tl.load(t_row + cols, mask=ok, other=float("-inf"), eviction_policy="evict_first").to(tl.float32) * INV_T
        ms_new = tl.maximum(ms, tl.max(ys, 0))
        mt_new = tl.maximum(mt, tl.max(yt, 0))
        ref_s = safe_max(ms_new)
        ref_t = safe_max(mt_new)
        es = tl.exp(ys - ref_s)
        et = tl.exp(yt - ref_t)
        top_s = is_top(ys, ms_new)
        top_t = is_top(yt, mt_new)
        diff_hi, diff_lo = two_diff(ys, yt)  # zs - zt exactly, for the columns at the max
        rest = tl.where(top_s | (es == 0), 0.0, es * (diff_hi - (ref_s - ref_t)))
        cs_b, rs_b, ct_b, rt_b, rest_b, hi_b, lo_b = sums7(
            top_s.to(tl.float32), tl.where(top_s, 0.0, es), top_t.to(tl.float32), tl.where(top_t, 0.0, et), rest,
            tl.where(top_s, diff_hi, 0.0), tl.where(top_s, diff_lo, 0.0))
        # a's terms are relative to (ms, mt); moving the references shifts each earlier term by the same amount.
        shift = (safe_max(ms).to(tl.float64) - ref_s.to(tl.float64)) - (safe_max(mt).to(tl.float64) - ref_t)
        ref_diff = ref_s.to(tl.float64) - ref_t.to(tl.float64)
        a = rescale(ms, ms_new).to(tl.float64) * (a + shift * (cs + rs).to(tl.float64)) + rest_b.to(tl.float64) \
            + ((hi_b.to(tl.float64) + lo_b.to(tl.float64)) - cs_b.to(tl.float64) * ref_diff)
        cs, rs = fold_mass(ms, cs, rs, ms_new)
        ct, rt = fold_mass(mt, ct, rt, mt_new)
        cs += cs_b
        rs += rs_b
        ct += ct_b
        rt += rt_b
        ms = ms_new
        mt = mt_new
    return ms, cs, rs, mt, ct, rt, a


@triton.jit
def _kl_finish(s_row, tok_ptr, kl_ptr, lses_ptr, lset_ptr, logp_ptr, row, ms, cs, rs, mt, ct, rt, a, V,
               vocab_start, ignore_index, INV_T: tl.constexpr, HAS_TOKENS: tl.constexpr):
    tl.store(kl_ptr + row, kl_value(cs, rs, ct, rt, a))
    log_ds = log_mass(cs, rs)
    tl.store(lses_ptr + row, lse_out(ms, log_ds))
    tl.store(lset_ptr + row, lse_out(mt, log_mass(ct, rt)))
    if HAS_TOKENS:
        in_shard, valid, x_tok = token_logit(s_row, tok_ptr, row, V, vocab_start, ignore_index)
        tl.store(logp_ptr + row, tl.where(in_shard, (x_tok * INV_T - ms) - log_ds, 0.0))


@triton.jit
def _kl_fwd_kernel(s_ptr, t_ptr, tok_ptr, kl_ptr, lses_ptr, lset_ptr, logp_ptr, part_ptr,
                   V, s_stride_r, t_stride_r, vocab_start, ignore_index,
                   chunk, INV_T: tl.constexpr, HAS_TOKENS: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    if SPLIT:
        s = tl.program_id(1)
        lo = s * chunk
        ms, cs, rs, mt, ct, rt, a = _kl_stats(s_row, t_row, lo, tl.minimum(lo + chunk, V), INV_T, BLOCK_V)
        part = part_ptr + (row * tl.num_programs(1) + s) * PARTS  # float64 workspace
        tl.store(part, ms.to(tl.float64))
        tl.store(part + 1, cs.to(tl.float64))
        tl.store(part + 2, rs.to(tl.float64))
        tl.store(part + 3, mt.to(tl.float64))
        tl.store(part + 4, ct.to(tl.float64))
        tl.store(part + 5, rt.to(tl.float64))
        tl.store(part + 6, a)
    else:
        ms, cs, rs, mt, ct, rt, a = _kl_stats(s_row, t_row, 0, V, INV_T, BLOCK_V)
        _kl_finish(s_row, tok_ptr, kl_ptr, lses_ptr, lset_ptr, logp_ptr, row, ms, cs, rs, mt, ct, rt, a, V,
                   vocab_start, ignore_index, INV_T, HAS_TOKENS)


@triton.jit
def _kl_combine_kernel(s_ptr, tok_ptr, kl_ptr, lses_ptr, lset_ptr, logp_ptr, part_ptr, n_split,
                       V, s_stride_r, vocab_start, ignore_index,
                       INV_T: tl.constexpr, HAS_TOKENS: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, SPLIT_BLOCK)
    part = part_ptr + (row * n_split + offs) * PARTS
    ok = offs < n_split
    ms_i = tl.load(part, mask=ok, other=float("-inf")).to(tl.float32)
    cs_i = tl.load(part + 1, mask=ok, other=0.0).to(tl.float32)
    rs_i = tl.load(part + 2, mask=ok, other=0.0).to(tl.float32)
    mt_i = tl.load(part + 3, mask=ok, other=float("-inf")).to(tl.float32)
    ct_i = tl.load(part + 4, mask=ok, other=0.0).to(tl.float32)
    rt_i = tl.load(part + 5, mask=ok, other=0.0).to(tl.float32)
    a_i = tl.load(part + 6, mask=ok, other=0.0)
    ms, cs, rs, sc_s = merge_parts(ms_i, cs_i, rs_i)
    mt, ct, rt, _ = merge_parts(mt_i, ct_i, rt_i)
    shift = (safe_max(ms_i).to(tl.float64) - safe_max(ms)) - (safe_max(mt_i).to(tl.float64) - safe_max(mt))
    a = tl.sum(tl.where(sc_s > 0, sc_s.to(tl.float64) * (a_i + shift * (cs_i + rs_i).to(tl.float64)), 0.0), 0)
    s_row = s_ptr + row * s_stride_r
    _kl_finish(s_row, tok_ptr, kl_ptr, lses_ptr, lset_ptr, logp_ptr, row, ms, cs, rs, mt, ct, rt, a, V, vocab_start,
               ignore_index, INV_T, HAS_TOKENS)


@triton.jit
def _kl_bwd_kernel(s_ptr, t_ptr, gkl_ptr, lses_ptr, lset_ptr, kl_ptr, out_ptr,
                   V, s_stride_r, t_stride_r, o_stride_r,
                   INV_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad_xs = inv_t * g * p_s * (log p_s - log p_t - KL); p_s == 0 (a -inf logit) gives 0, NaN stays NaN.
    out_ptr may be s_ptr (the in-place form): each program reads its block before writing it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    lse_s_hi, lse_s_lo = split_lse(lses_ptr, row)
    # log p_s - log p_t - kl = (zs - zt) - C, C = kl + lse_s - lse_t in float64, split hi + lo, zs - zt exact
    # (TwoSum): where the student is confident and the teacher is not, both are ~|z| and differ by little.
    c = tl.load(kl_ptr + row).to(tl.float64) + (tl.load(lses_ptr + row).to(tl.float64)
                                                 - tl.load(lset_ptr + row).to(tl.float64))
    c_hi = c.to(tl.float32)
    c_lo = (c - c_hi.to(tl.float64)).to(tl.float32)
    g = tl.load(gkl_ptr + row).to(tl.float32)
    # Rows with a zero upstream gradient (masked rows) are not read and get exact zeros, even with NaN logits.
    active = cols < tl.where(g != 0.0, V, 0)
    zs = tl.load(s_row + cols, mask=active, other=float("-inf")).to(tl.float32) * INV_T
    zt = tl.load(t_row + cols, mask=active, other=float("-inf")).to(tl.float32) * INV_T
    p = tl.exp((zs - lse_s_hi) - lse_s_lo)
    diff_hi, diff_lo = two_diff(zs, zt)
    u = (diff_hi - c_hi) + (diff_lo - c_lo)
    grad = tl.where(p == 0, 0.0, p * u * (g * INV_T))
    grad = tl.where(active, grad, 0.0)
    tl.store(out_ptr + row * o_stride_r + cols, to_output_dtype(grad, out_ptr), mask=ok)


def _fwd(xs, xt, tokens, inv_t, vocab_start, ignore_index, split=None):
    check_device(xs)
    check_same_rows(xs, xt)
    N, V, ssr = check_rows(xs, "student logits")
    _, _, tsr = check_rows(xt, "teacher logits")
    check_vocab(N, V, "student logits")
    has_tok = tokens is not None
    tokens = row_vector(tokens, N, xs.device, "tokens", integer=True)
    inv_t = checked_inv_t(inv_t)
    f32 = dict(device=xs.device, dtype=torch.float32)
    kl, lse_s, lse_t = (torch.empty(N, device=xs.device, dtype=torch.float64) for _ in range(3))
    logp = torch.empty(N if has_tok else 0, **f32)
    if N == 0:
        return kl, lse_s, lse_t, logp
    block_v, warps = block_config(xs if xs.element_size() >= xt.element_size() else xt)
    n_split, chunk = split_config(xs, N, V, block_v, split)
    tok_arg, logp_arg = (tokens, logp) if has_tok else (lse_s, kl)  # dummies: never read when HAS_TOKENS=False
    common = dict(V=V, s_stride_r=ssr, vocab_start=int(vocab_start),
                  ignore_index=int(ignore_index), INV_T=inv_t, HAS_TOKENS=has_tok)
    with device_ctx(xs):
        if n_split == 1:
            _kl_fwd_kernel[(N, 1)](xs, xt, tok_arg, kl, lse_s, lse_t, logp_arg, kl, t_stride_r=tsr,
                                   chunk=chunk, SPLIT=False, BLOCK_V=block_v, num_warps=warps, **EXACT, **common)
        else:
            part = torch.empty(N, n_split, PARTS.value, device=xs.device, dtype=torch.float64)
            _kl_fwd_kernel[(N, n_split)](xs, xt, tok_arg, kl, lse_s, lse_t, logp_arg, part, t_stride_r=tsr,
                                         chunk=chunk, SPLIT=True, BLOCK_V=block_v, num_warps=warps, **EXACT, **common)
            _kl_combine_kernel[(N,)](xs, tok_arg, kl, lse_s, lse_t, logp_arg, part, n_split,
                                     SPLIT_BLOCK=split_block(n_split), num_warps=1, **EXACT, **common)
    return kl, lse_s, lse_t, logp


def kl_fwd(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor | None, inv_temperature: float,
           vocab_start: int, ignore_index: int):
    """Shard-local (kl, lse_s, lse_t, logp_s), [N]: kl, lse_s, lse_t float64 (they feed kl_bwd), logp_s fp32 (an
    empty [0] tensor when tokens is None).

    student, teacher: [N, V] views of the same shape, unit vocabulary stride, any float dtypes
    (they may differ). kl = sum_v p_s (log p_s - log p_t) over the shard, p = softmax(x * inv_t) of the shard.
    """
    return _fwd(student, teacher, tokens, inv_temperature, vocab_start, ignore_index)


def kl_bwd(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor, lse_s: torch.Tensor,
           lse_t: torch.Tensor, kl: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """grad w.r.t. the student logits (dtype and shape of student, contiguous) from the GLOBAL fp32 [N] scalars."""
    return _bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature, None)


def kl_bwd_inplace(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor, lse_s: torch.Tensor,
                   lse_t: torch.Tensor, kl: torch.Tensor, inv_temperature: float) -> None:
    """kl_bwd written into the student's own rows (they must not overlap): no [N, V] allocation."""
    check_writable(student, "student logits")
    _bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature, student)


def kl_fwd_inplace(student: torch.Tensor, teacher: torch.Tensor, grad_kl: torch.Tensor | None,
                   inv_temperature: float):
    """(kl, lse_s, lse_t) float64 [N] of kl_fwd, then the student overwritten with grad_kl * inv_t * p_s (log p_s -
    log p_t - KL) (grad_kl None = 1; rows with grad_kl == 0: zeros). Two launches, as logprob_fwd_inplace."""
    check_writable(student, "student logits")
    kl, lse_s, lse_t, _ = _fwd(student, teacher, None, inv_temperature, 0, -100)
    if grad_kl is None:
        grad_kl = torch.ones(student.shape[0], device=student.device, dtype=torch.float32)
    _bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature, student)
    return kl, lse_s, lse_t


def _bwd(student, teacher, grad_kl, lse_s, lse_t, kl, inv_temperature, out):
    check_device(student)
    check_same_rows(student, teacher)
    N, V, ssr = check_rows(student, "student logits")
    _, _, tsr = check_rows(teacher, "teacher logits")
    check_vocab(N, V, "student logits")
    dev = student.device
    grad_kl, lse_s, lse_t, kl = (row_vector(t, N, dev, n) for t, n in
                                 ((grad_kl, "grad_kl"), (lse_s, "lse_s"), (lse_t, "lse_t"), (kl, "kl")))
    out = torch.empty(student.shape, device=dev, dtype=student.dtype) if out is None else out
    if out.numel() == 0:
        return out
    block_v, warps = block_config(student if student.element_size() >= teacher.element_size() else teacher)
    with device_ctx(student):
        _kl_bwd_kernel[(N, triton.cdiv(V, block_v))](
            student, teacher, grad_kl, lse_s, lse_t, kl, out, V, ssr, tsr, out.stride(0),
            INV_T=checked_inv_t(inv_temperature), BLOCK_V=block_v, num_warps=warps, **EXACT)
    return out
