"""Shared pieces of the Triton row kernels: input checks, row addressing, launch configs, online-softmax merges.

Numerics used by every kernel (all in fp32):
- Work in natural units on ``z = x * inv_t`` (exact when T = 1) and take every exponential as ``exp(z - m)``:
  Triton emits one multiply + one MUFU.EX2 for it, and the log2(e) scaling rounds the small ``z - m`` rather
  than z itself (a base-2 ``y = x * inv_t * log2(e)`` would round every logit, ~eps * |y| per element, which is
  more than PyTorch's fp32 path loses at T = 1).
- Online softmax state per row: ``m`` = running max of z, ``d = sum exp(z - m)``. Rows or blocks that are entirely
  ``-inf`` (vocabulary tail, masked/padded vocabulary) keep ``m = -inf``; every rescale factor is guarded
  (``_rescale``) so that ``-inf - -inf`` never produces NaN, while real NaN logits still reach ``d`` and
  therefore every output.
- Entropy accumulator ``b = sum exp(z - m) (z - m)``: entropy = log d - b / d; shifted by the running max so
  large logits lose no precision.
- KL accumulator ``a = sum exp(zs - ms) ((zs - zt) - (ms - mt))``: KL = a / ds + log(dt / ds). Both maxima
  cancel exactly, so student == teacher gives exactly 0; ``zs - zt`` is exact for near-identical rows.
"""
from __future__ import annotations

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
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _NULL_CTX


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL_CTX = _NullCtx()


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_config(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the streaming loops.

    GPU: 8 KiB of one row per iteration per program (bf16/fp16: 4096 columns, fp32: 2048) over 8 warps, i.e.
    16 B per thread per load instruction = one 128-bit load when the row start is 16-B aligned. ~40 registers per
    thread let 8 programs share an SM, so ~64 KiB of loads are in flight per SM: enough to cover HBM latency at
    ~3 TB/s (Little's law needs ~20 KiB/SM). To be confirmed on the GPU (see the report).
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
def token_logit(x_row, tok_ptr, row, V, vocab_start, ignore_index):
    """(in_shard, valid, x[token]) of one row: the sampled token's logit when this shard owns it."""
    tok = tl.load(tok_ptr + row)
    col = tok - vocab_start
    valid = tok != ignore_index
    in_shard = valid & (col >= 0) & (col < V)
    x_tok = tl.load(x_row + col, mask=in_shard, other=0.0).to(tl.float32)
    return in_shard, valid, x_tok
