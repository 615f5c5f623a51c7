"""Input validation for the public ops: clear ValueError / TypeError before any kernel runs.

Metadata (shapes, dtypes, devices, scalars) is checked in the public functions: free, no host sync.

Token *values* need a reduction over the tokens and, on a GPU, a host sync to raise. The rule, set by the
environment variable ``OPD_KERNELS_CHECK_TOKENS``:
- ``auto`` (default): check CPU tensors (one [N] reduction, nothing next to the [N, V] read), skip CUDA tensors;
- ``1``: check every call (on CUDA this syncs with the host: for debugging);
- ``0``: never check.
The check runs inside the custom ops, so it also runs under ``torch.compile``. An unchecked out-of-range id
(CUDA default) is never read out of bounds: the kernels treat it as a token of no shard and return 0.
"""
from __future__ import annotations

import math
import os
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHECK_ENV = "OPD_KERNELS_CHECK_TOKENS"


def logits(x, name: str) -> int:
    """Check a ``[..., V]`` logits tensor; returns V."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., V], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}; cast it with .float()")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(x.shape)}")
    return x.shape[-1]


def tokens(t, logits_: torch.Tensor, name: str = "tokens") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 token ids, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {t.dtype}; pass {name}.long()")
    same_positions(t, logits_, name, "logits")


def same_positions(t: torch.Tensor, logits_: torch.Tensor, name: str, logits_name: str) -> None:
    """``t`` holds one value per row of ``logits_`` (shape ``logits_.shape[:-1]``, same device)."""
    if tuple(t.shape) != tuple(logits_.shape[:-1]):
        raise ValueError(f"{name} must have shape {logits_name}.shape[:-1] = {tuple(logits_.shape[:-1])}, "
                         f"got {tuple(t.shape)}")
    if t.device != logits_.device:
        raise ValueError(f"{name} is on {t.device} but {logits_name} is on {logits_.device}; move them together")


def float_values(t, logits_: torch.Tensor, name: str) -> torch.Tensor:
    """A per-position float input (advantages, teacher log-probs) as contiguous fp32."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    same_positions(t, logits_, name, "student_logits")
    return t.detach().float().contiguous()


def mask(m, logits_: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (bool, or numbers where 0 = masked out) as a bool tensor."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool, or numbers with 0 = masked), got {type(m).__name__}")
    if m.is_complex():
        raise TypeError(f"mask must be bool or real numbers, got {m.dtype}")
    same_positions(m, logits_, "mask", "logits")
    return m if m.dtype == torch.bool else m != 0


def positive_scalar(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def finite_scalar(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value


def pair(student: torch.Tensor, teacher, student_name: str, teacher_name: str, *, sharded: bool = False
         ) -> torch.Tensor:
    """Student and teacher logits describe the same positions over the same vocabulary; returns the teacher's
    view over the student's columns.

    The dtypes may differ (a bf16 teacher for an fp32 student, or the reverse): every backend reads each input in
    its own dtype. A teacher with MORE columns than the student is a padded embedding of the same tokenizer
    (Qwen2.5 7B has 151936 rows, 14B and up 152064, both over the same 151665 ids): its columns beyond the
    student's are never a token, so the ops read ``teacher[..., :V]`` (a view, not a copy) and ignore them.
    Under a vocabulary-sharded process group the shards of a wider teacher would not line up: refused."""
    logits(teacher, teacher_name)
    V, Vt = student.shape[-1], teacher.shape[-1]
    if Vt > V and not sharded:
        teacher = teacher[..., :V]
    elif Vt != V:
        why = ("the teacher must use the student's vocabulary (and tokenizer)" if Vt < V else
               "a padded teacher vocabulary is supported unsharded only: slice both to the tokenizer's ids "
               "before sharding, or pad the student's embedding to the same size")
        raise ValueError(f"{teacher_name} has vocabulary size {Vt} but {student_name} has {V}: {why}")
    if tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(f"{teacher_name} shape {tuple(teacher.shape)} != {student_name} shape "
                         f"{tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} is on {teacher.device} but {student_name} is on {student.device}")
    return teacher


def token_values(t: torch.Tensor, vocab_total: int, ignore_index: int | None = None,
                 mask_: torch.Tensor | None = None) -> None:
    """Raise ValueError when an id (not ignored, not masked out) is outside [0, vocab_total); see module doc."""
    mode = os.environ.get(_CHECK_ENV, "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{_CHECK_ENV}={mode!r}: use auto, 0 or 1")
    if mode == "0" or (mode == "auto" and t.device.type != "cpu") or t.numel() == 0:
        return
    bad = (t < 0) | (t >= vocab_total)
    if ignore_index is not None:
        bad &= t != ignore_index
    if mask_ is not None:
        bad &= mask_
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        allowed = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise ValueError(f"token id {int(t[where])} at position {where} is outside the vocabulary "
                         f"[0, {vocab_total}){allowed}; fix the ids or mask that position out")


def topk(ids, logprobs, logits_: torch.Tensor) -> None:
    """A teacher top-K: ids [..., K] int64 and log-probs [..., K] float over the rows of ``logits_`` [..., V]."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        raise TypeError(f"topk_ids must be an int64 tensor [..., K], got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("topk_logprobs must be a floating-point tensor [..., K] (the teacher's log-probs)")
    if ids.dim() != logits_.dim() or tuple(ids.shape[:-1]) != tuple(logits_.shape[:-1]) or ids.shape[-1] < 1:
        raise ValueError(f"topk_ids must have shape logits.shape[:-1] + (K,) = {tuple(logits_.shape[:-1])} + (K,) "
                         f"with K >= 1, got {tuple(ids.shape)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(logprobs.shape)} != topk_ids shape {tuple(ids.shape)}")
    for t, name in ((ids, "topk_ids"), (logprobs, "topk_logprobs")):
        if t.device != logits_.device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {logits_.device}")


def topk_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab_total: int, valid: torch.Tensor) -> None:
    """Used slots (0 <= id < vocab_total) of valid rows: distinct ids, log-probs that are log-probabilities.
    Checked under the ``OPD_KERNELS_CHECK_TOKENS`` rule (CPU by default: the check needs a host sync)."""
    mode = os.environ.get(_CHECK_ENV, "auto")
    if mode == "0" or (mode == "auto" and ids.device.type != "cpu") or ids.numel() == 0:
        return
    used = (ids >= 0) & (ids < vocab_total) & valid.unsqueeze(-1)
    ordered = torch.where(used, ids, -1 - torch.arange(ids.shape[-1], device=ids.device)).sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("topk_ids repeat an id within a row; each row must list distinct token ids")
    lp = torch.where(used, logprobs.double(), torch.full_like(logprobs, -torch.inf, dtype=torch.float64))
    if bool((used & torch.isnan(lp)).any()) or bool((lp > 1e-6).any()):
        raise ValueError("topk_logprobs must be log-probabilities (<= 0, not NaN) on the used slots")
    if bool((torch.logsumexp(lp, -1) > 1e-3).any()):
        raise ValueError("the teacher's top-K probabilities sum to more than 1 in some row; pass log-probs "
                         "(log_softmax of the teacher logits), not logits")
