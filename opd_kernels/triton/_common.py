"""Shared pieces of the Triton row kernels: input checks, row addressing, launch configs, online-softmax merges.

Numerics used by every kernel (all in fp32):
- Work in natural units on ``z = x * inv_t`` (exact when T = 1) and take every exponential as ``exp(z - m)``:
  Triton emits one multiply + one MUFU.EX2 for it, and the log2(e) scaling rounds the small ``z - m`` rather
  than z itself (a base-2 ``y = x * inv_t * log2(e)`` would round every logit, ~eps * |y| per element, which is
  more than PyTorch's fp32 path loses at T = 1).
- Online softmax state per row: ``m`` = running max of z and the denominator ``d = sum exp(z - m)`` kept as
  ``d = c + r``: c counts the logits equal to the max (each adds exactly 1), r sums exp(z - m) over the others.
  For a confident row r << 1 keeps its relative precision, where a running sum d ~ 1 would round every small
  term against 1; log d = log c + log1p(r / c) then gives log-probs near 0 and entropies near 0 to ~1 ulp.
  The log-sum-exps leave the forwards as float64 (m + log d summed in double) and the backwards split them
  into fp32 hi + lo (the contract in opd_kernels/ops/README.md). Rows or blocks that are entirely ``-inf``
  (vocabulary tail, masked/padded vocabulary) keep ``m = -inf``; every rescale factor is guarded (``rescale``)
  so that ``-inf - -inf`` never produces NaN, while real NaN logits still reach r and so every output.
- Entropy accumulator ``b = sum exp(z - m) (z - m)``: entropy = log d - b / d; shifted by the running max so
  large logits lose no precision. Log-probs are formed as (z_tok - m) - log d, never as z_tok - lse.
- KL accumulator ``a = sum exp(zs - ms) ((zs - zt) - (ms - mt))`` in float64, fed per block: the columns at the
  student's max (weight exactly 1) add their term exactly (zs - zt as an fp32 TwoSum pair), the others an fp32
  block sum. KL = a / ds + log1p((dt - ds) / ds), returned as float64. Why: where the student is confident and
  the teacher is not, KL ~ |z| ~ 40 and the backward's log p_s - log p_t - KL is a small difference of two such
  numbers; an fp32 KL or one rounding of that column's term would cost eps |z| (opd_kernels/ops/README.md).
  Student == teacher gives exactly 0.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether the kernels of this package were defined for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = tl.constexpr(_INTERPRETED)


# --------------------------------------------------------------------------------------------------------------
# Python-side helpers
# --------------------------------------------------------------------------------------------------------------

def check_rows(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    """Validates a 2-D [N, V] logits view (unit vocabulary stride, any row stride, 0 included) -> (N, V, stride)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, V] view, got shape {tuple(x.shape)}")
    N, V = x.shape
    if V > 1 and N > 0 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary (got stride {x.stride(1)}); "
                         "call .contiguous() first")
    return N, V, x.stride(0)


def check_writable(x: torch.Tensor, name: str) -> None:
    """The in-place kernels write into x's own rows: they must not overlap (a broadcast row would be written N
    times with different gradients)."""
    if x.dim() == 2 and x.shape[0] > 1 and x.stride(0) < x.shape[1]:
        raise ValueError(f"{name} rows overlap (row stride {x.stride(0)} < V = {x.shape[1]}); the in-place kernels "
                         "need distinct rows")


def check_vocab(N: int, V: int, name: str) -> None:
    if V == 0 and N > 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape [..., 0]); every row needs >= 1 logit")


def row_vector(t: torch.Tensor | None, N: int, device: torch.device, name: str, *, integer: bool = False):
    """A per-row tensor as a contiguous 1-D [N] view (no copy when it already is one)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != N:
        raise ValueError(f"{name} must hold one value per row ({N}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}; move it to the same device")
    if integer and t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 token ids, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.reshape(N).contiguous()


def check_same_rows(xs: torch.Tensor, xt: torch.Tensor) -> None:
    if xs.shape != xt.shape:
        raise ValueError(f"student and teacher logits must have the same shape (same rows, same vocabulary shard), "
                         f"got {tuple(xs.shape)} and {tuple(xt.shape)}")
    if xs.device != xt.device:
        raise ValueError(f"student logits are on {xs.device} but teacher logits on {xt.device}")


def checked_inv_t(inv_t: float) -> float:
    """1 / T, checked: finite and > 0. It becomes a tl.constexpr: one compiled kernel per distinct temperature (a
    run uses one or two), and at T = 1 the multiply disappears."""
    inv_t = float(inv_t)
    if not (math.isfinite(inv_t) and inv_t > 0.0):
        raise ValueError(f"inv_temperature must be finite and > 0, got {inv_t}")
    return inv_t


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError("Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing opd_kernels.triton (or use the cpp backend for CPU tensors)")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"Triton kernels need CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {x.device}")


def device_ctx(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device) without changing it for the caller."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------

# Every launch passes EXACT: Triton's default fp fusion contracts a * b + c into fma.rn.f32 (and leaves plain
# mul/add that ptxas fuses too), which breaks the kernels' exact identities: z = x * inv_t must be rounded before
# z - max (exactly 0 at the max; the top token of a confident row gets log-prob 0) and two_diff's TwoSum needs
# every rounding. tests/ops/test_exact_ptx.py compiles the kernels to PTX on the CPU and checks it.
EXACT = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_config(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the streaming loops.

    GPU: 8 KiB of one row per iteration per program (bf16/fp16: 4096 columns, fp32: 2048) over 8 warps, i.e.
    32 B per thread = two 128-bit loads when the row start is 16-B aligned (Triton proves it from the pointer and
    stride specialisation). With ~64 registers per thread (an estimate) 4 programs share an SM, ~32 KiB of loads
    in flight per SM: Little's law asks ~20 KiB/SM at ~3 TB/s. Untuned: measure BLOCK_V 2048-16384 x 4-16 warps
    on the GPU (benchmarks: python -m benchmarks --device cuda --backends triton).
    Interpreter: one large block per row (numpy vectorises the block; the loop count dominates run time).
    """
    if _INTERPRETED:
        return 8192, 1
    return (2048 if x.element_size() == 4 else 4096), 8


def split_config(x: torch.Tensor, N: int, V: int, block_v: int, split: int | None) -> tuple[int, int]:
    """(number of column splits per row, columns per split). One program per row when rows are plentiful; when
    there are fewer than ~4 programs per SM, split every row's vocabulary across programs (then a tiny combine
    kernel merges the per-split softmax states) so that every SM streams."""
    if split is None:
        split = 1
        if x.device.type == "cuda" and N > 0:
            target = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
            if N < target:
                max_split = max(1, triton.cdiv(V, 4 * block_v))  # keep >= 4 blocks of work per program
                split = min(triton.cdiv(target, N), max_split, 64)
    split = max(1, min(int(split), max(1, triton.cdiv(V, block_v))))
    chunk = triton.cdiv(triton.cdiv(max(V, 1), split), block_v) * block_v
    return triton.cdiv(max(V, 1), chunk), chunk


def split_block(split: int) -> int:
    return max(2, triton.next_power_of_2(split))


# --------------------------------------------------------------------------------------------------------------
# Device-side helpers (inlined into the kernels)
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def safe_max(m):
    """The running max used as exponent reference: 0 instead of -inf, so exp(z - ref) never sees -inf - -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def rescale(m_old, m_new):
    """exp(m_old - m_new) for the accumulators of a state whose max moves from m_old to m_new (>= m_old); 0 while
    the old state is empty (m_old = -inf), so an empty state never yields inf * 0."""
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - safe_max(m_new)))


@triton.jit
def is_top(z, m):
    """z == m for a finite max m. All False while m = -inf (empty) or m = +inf (an inf logit: it then lands in
    the rest with exp(inf - inf) = NaN, so the row is NaN as the contract says); comparisons with NaN are False."""
    return z == tl.where(tl.abs(m) == float("inf"), float("nan"), m)


@triton.jit
def fold_mass(m, c, r, m_new):
    """(c, r) of a state whose max moves from m to m_new >= m: when it moves, the logits counted at the old max
    fall below the new one (r = exp(m - m_new) (c + r), c = 0)."""
    moved = m_new > m
    return tl.where(moved, 0.0, c), tl.where(moved, rescale(m, m_new) * (c + r), r)


@triton.jit
def merge_parts(m_i, c_i, r_i):
    """Merge a vector of partial states (m_i, c_i, r_i) -> (m, c, r) and each part's scale exp(m_i - m)."""
    m = tl.max(m_i, 0)
    top = is_top(m_i, m)
    scale = rescale(m_i, m)
    c = tl.sum(tl.where(top, c_i, 0.0), 0)
    r = tl.sum(tl.where(top, r_i, scale * (c_i + r_i)), 0)
    return m, c, r, scale


@triton.jit
def log1p(x):
    """log(1 + x), accurate for tiny x without libdevice (Goldberg: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def log_mass(c, r):
    """log d for d = c + r (c >= 1 for any row with a finite logit; c = 0 only for an all -inf part)."""
    return tl.where(c > 0, tl.log(c) + log1p(r / c), tl.log(r))


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _add7(a0, a1, a2, a3, a4, a5, a6, b0, b1, b2, b3, b4, b5, b6):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6


# Block sums of several vectors. On the GPU one multi-operand tl.reduce shares one shared-memory round (one
# barrier) between all of them; Triton's interpreter runs a tl.reduce combine function in Python, element by
# element (slow, and a sequential fp32 sum), so there each vector gets its own tl.sum (numpy, pairwise).
@triton.jit
def sums2(x0, x1):
    if INTERPRETED:
        return tl.sum(x0, 0), tl.sum(x1, 0)
    else:
        return tl.reduce((x0, x1), 0, _add2)


@triton.jit
def sums3(x0, x1, x2):
    if INTERPRETED:
        return tl.sum(x0, 0), tl.sum(x1, 0), tl.sum(x2, 0)
    else:
        return tl.reduce((x0, x1, x2), 0, _add3)


@triton.jit
def sums7(x0, x1, x2, x3, x4, x5, x6):
    if INTERPRETED:
        return (tl.sum(x0, 0), tl.sum(x1, 0), tl.sum(x2, 0), tl.sum(x3, 0), tl.sum(x4, 0), tl.sum(x5, 0),
                tl.sum(x6, 0))
    else:
        return tl.reduce((x0, x1, x2, x3, x4, x5, x6), 0, _add7)


@triton.jit
def two_diff(a, b):
    """(hi, lo) with hi + lo == a - b exactly (Knuth's TwoSum of a and -b; fp32 in, fp32 out); lo = 0 when hi is
    infinite (a -inf teacher logit under student mass: the KL is +inf, not NaN)."""
    hi = a - b
    bb = hi - a
    lo = (a - (hi - bb)) + (-b - bb)
    return hi, tl.where(tl.abs(hi) == float("inf"), 0.0, lo)


@triton.jit
def kl_value(cs, rs, ct, rt, a):
    """KL = a / ds + log(dt / ds) in float64 (a is float64), the log as log1p((dt - ds) / ds) with
    dt - ds = (ct - cs) + (rt - rs): exact for identical rows, precise for near-identical ones."""
    ds = cs.to(tl.float64) + rs.to(tl.float64)
    return a / ds + log1p(((ct - cs).to(tl.float64) + (rt.to(tl.float64) - rs.to(tl.float64))) / ds)


@triton.jit
def lse_out(m, log_d):
    """The float64 log-sum-exp the contract returns: m + log d summed in double (fp32 would round it to
    eps * |lse|, ~2e-6 at 40, and the backward's 1 - p of a confident token would inherit that)."""
    return m.to(tl.float64) + log_d.to(tl.float64)


@triton.jit
def split_lse(lse_ptr, row):
    """(hi, lo) in fp32 of a per-row float64 (or fp32) lse: log p = (z - hi) - lo, whose first difference is
    exact near the row max."""
    lse = tl.load(lse_ptr + row).to(tl.float64)
    hi = lse.to(tl.float32)
    return hi, (lse - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def to_output_dtype(x, out_ptr):
    """x (fp32) as out_ptr's element type, rounded to nearest even. Triton's interpreter truncates fp32 -> bf16
    (GPUs round), so there the rounding is done on the bits first; NaN stays NaN."""
    if INTERPRETED and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, rounded)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def token_logit(x_row, tok_ptr, row, V, vocab_start, ignore_index):
    """(in_shard, valid, x[token]) of one row: the sampled token's logit when this shard owns it."""
    tok = tl.load(tok_ptr + row)
    col = tok - vocab_start
    valid = tok != ignore_index
    in_shard = valid & (col >= 0) & (col < V)
    x_tok = tl.load(x_row + col, mask=in_shard, other=0.0).to(tl.float32)
    return in_shard, valid, x_tok
