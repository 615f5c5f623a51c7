"""Input checks shared by the algorithm functions.

Every public function of ``opd_train.algo`` validates its tensors here, before any work, so that a caller with a
wrong shape, a non-binary mask or a NaN teacher score gets one ValueError naming the argument and the fix instead of
a silent broadcast or a NaN loss many steps later. The checks that look at values (``.any()``) sync with the host;
they run on ``[B, T]`` tensors, once per training step, which is negligible next to a forward pass.
"""
from __future__ import annotations

import math

import torch


def as_bool_mask(mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """``mask`` as a bool tensor; a float/int mask must hold only 0 and 1 (weights are not supported)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1 (1 = trainable token); found other values. "
                         "Pass a bool mask, or 0/1 integers/floats")
    return mask != 0


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise when any non-None tensor in ``others`` does not have ``reference``'s shape."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {reference_name} has shape "
                             f"{tuple(reference.shape)}; both must be [B, T] over the same right-padded batch")


def check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (samples x response tokens, right-padded); got shape "
                         f"{tuple(t.shape)}")


def check_finite_where(name: str, t: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise naming the first (sample, token) where ``t`` is NaN/Inf inside ``mask``."""
    bad = mask & ~torch.isfinite(t)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{name} is not finite at index {tuple(first)} (value {t[tuple(first)].item()}) inside "
                         "the response mask; check that it is aligned with the response span and that the "
                         "scorer returned a value for every trainable token")


def check_coef(name: str, value: float, *, allow_zero: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}; got {value}")
    return value


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any floating input is float64 (tests, oracles), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
