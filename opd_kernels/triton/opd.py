"""Triton fused OPD epilogues: the per-token advantage update in the same launch as the row reduction.

Contract (opd_kernels/ops/README.md, whole vocabulary, vocab_start = 0):
- ``opd_sampled_fwd(x, tokens, advantages, teacher_logp, mask, coef, inv_t, kl_kind) -> (adv_out, kl, logp)``:
  logp = log p_S(token) at temperature T, d = logp - teacher_logp, kl = k1 d | k2 d^2/2 | k3 e^-d - 1 + d,
  adv_out = advantages - coef * kl.
- ``opd_full_fwd(xs, xt, tokens, advantages, mask, coef, inv_t) -> (adv_out, kl, logp)``: kl the exact
  full-vocabulary KL(p_S || p_T) of the row pair.
Rows with mask == False are not read (kl = logp = 0, adv_out = advantages); tokens outside [0, V) give logp = 0.

Design note: grid (N,), one program per row streams the row(s) exactly as ``logprob_fwd`` / ``kl_fwd`` do (same
jit helpers), then does the scalar epilogue in fp64 (d, k1/k2/k3, A - coef * k), so ``opd_advantages`` costs
one launch and one read of the logits. No column split here (one launch matters more; N is large in training).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (EXACT, block_config, check_device, check_rows, check_same_rows, check_vocab, checked_inv_t,
                      device_ctx, kl_value, log_mass, row_vector)
from .kl import _kl_stats
from .logprob import _logprob_stats

KL_KINDS = {1: "k1", 2: "k2", 3: "k3"}


@triton.jit
def _sampled_kl(d, KL_KIND: tl.constexpr):
    """k1 / k2 / k3 of d (fp64). k3 = e^-d - 1 + d cancels for small |d|: below 1e-3 use its Taylor series
    d^2/2 - d^3/6 + d^4/24 (next term < 1e-11 relative); above, fp64 leaves < 1e-9 relative error."""
    if KL_KIND == 1:
        return d
    elif KL_KIND == 2:
        return 0.5 * d * d
    else:
        series = d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0)))
        return tl.where(tl.abs(d) < 1e-3, series, tl.exp(-d) - 1.0 + d)


@triton.jit
def _store_epilogue(row, keep, lp, k, adv_ptr, coef, adv_out_ptr, kl_ptr, logp_ptr):
    adv = tl.load(adv_ptr + row).to(tl.float64)
    tl.store(adv_out_ptr + row, tl.where(keep, adv - k * coef, adv).to(tl.float32))  # fp64 (k is fp64)
    tl.store(kl_ptr + row, tl.where(keep, k, 0.0).to(tl.float32))
    tl.store(logp_ptr + row, tl.where(keep, lp, 0.0))


@triton.jit
def _token_logp(x_row, tok_ptr, row, m, log_d, V, INV_T: tl.constexpr):
    tok = tl.load(tok_ptr + row)
    own = (tok >= 0) & (tok < V)
    x_tok = tl.load(x_row + tok, mask=own, other=0.0).to(tl.float32)
    return tl.where(own, (x_tok * INV_T - m) - log_d, 0.0)


@triton.jit
def _opd_sampled_kernel(x_ptr, tok_ptr, adv_ptr, tlp_ptr, mask_ptr, adv_out_ptr, kl_ptr, logp_ptr, V, stride_r,
                        coef, INV_T: tl.constexpr, KL_KIND: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_r
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    m, c, r, _ = _logprob_stats(x_row, 0, tl.where(keep, V, 0), INV_T, False, BLOCK_V)  # masked rows: not read
    lp = _token_logp(x_row, tok_ptr, row, m, log_mass(c, r), V, INV_T)
    diff = lp.to(tl.float64) - tl.load(tlp_ptr + row).to(tl.float64)
    _store_epilogue(row, keep, lp, _sampled_kl(diff, KL_KIND), adv_ptr, coef, adv_out_ptr, kl_ptr, logp_ptr)


@triton.jit
def _opd_full_kernel(s_ptr, t_ptr, tok_ptr, adv_ptr, mask_ptr, adv_out_ptr, kl_ptr, logp_ptr, V, s_stride_r,
                     t_stride_r, coef, INV_T: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_r
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    ms, cs, rs, mt, ct, rt, a = _kl_stats(s_row, t_ptr + row * t_stride_r, 0, tl.where(keep, V, 0), INV_T, BLOCK_V)
    lp = _token_logp(s_row, tok_ptr, row, ms, log_mass(cs, rs), V, INV_T)
    _store_epilogue(row, keep, lp, kl_value(cs, rs, ct, rt, a), adv_ptr, coef, adv_out_ptr, kl_ptr, logp_ptr)


def _rows_and_outputs(x, tokens, advantages, mask):
    N, V, stride = check_rows(x, "logits")
    check_vocab(N, V, "logits")
    dev = x.device
    tokens = row_vector(tokens, N, dev, "tokens", integer=True)
    advantages = row_vector(advantages, N, dev, "advantages")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.numel() != N or mask.device != dev:
            raise ValueError(f"mask must hold one bool per row ({N}) on {dev}, got {tuple(mask.shape)} on "
                             f"{mask.device}")
        mask = mask.reshape(N).contiguous()
    outs = tuple(torch.empty(N, device=dev, dtype=torch.float32) for _ in range(3))
    return N, V, stride, tokens, advantages, mask, outs


def opd_sampled_fwd(logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                    teacher_logp: torch.Tensor, mask: torch.Tensor | None, coef: float, inv_temperature: float,
                    kl_kind: int):
    """(advantages_out, kl, logp), fp32 [N]: sampled-token OPD in one launch (see the module docstring)."""
    check_device(logits)
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be 1 (k1), 2 (k2) or 3 (k3), got {kl_kind!r}")
    N, V, stride, tokens, advantages, mask, outs = _rows_and_outputs(logits, tokens, advantages, mask)
    teacher_logp = row_vector(teacher_logp, N, logits.device, "teacher_logp")
    if N == 0:
        return outs
    block_v, warps = block_config(logits)
    with device_ctx(logits):
        _opd_sampled_kernel[(N,)](logits, tokens, advantages, teacher_logp, mask if mask is not None else tokens,
                                  *outs, V, stride, float(coef), INV_T=checked_inv_t(inv_temperature), KL_KIND=kl_kind,
                                  HAS_MASK=mask is not None, BLOCK_V=block_v, num_warps=warps, **EXACT)
    return outs


def opd_full_fwd(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor | None, coef: float, inv_temperature: float):
    """(advantages_out, kl, logp), fp32 [N]: exact full-vocabulary KL OPD in one launch (module docstring)."""
    check_device(student)
    check_same_rows(student, teacher)
    N, V, s_stride, tokens, advantages, mask, outs = _rows_and_outputs(student, tokens, advantages, mask)
    _, _, t_stride = check_rows(teacher, "teacher logits")
    if N == 0:
        return outs
    block_v, warps = block_config(student if student.element_size() >= teacher.element_size() else teacher)
    with device_ctx(student):
        _opd_full_kernel[(N,)](student, teacher, tokens, advantages, mask if mask is not None else tokens, *outs,
                               V, s_stride, t_stride, float(coef), INV_T=checked_inv_t(inv_temperature),
                               HAS_MASK=mask is not None, BLOCK_V=block_v, num_warps=warps, **EXACT)
    return outs
