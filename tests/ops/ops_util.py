"""Shared helpers of the op tests: inputs that stress the numerics, and the tolerance rule.

Tolerance rule (issue 2 / LAYOUT): on the same input, an op's max abs error against the float64 oracle may be at
most twice the max abs error of PyTorch's own fp32 path (the ``*_reference`` function fed ``x.float()``), plus a
floor of one fp32 ulp of the largest oracle value for the cases where PyTorch's error happens to be ~0.
"""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps
VOCABS = (151936, 128256, 50257, 32000, 1031, 7, 1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows_for(vocab: int, slow: bool) -> int:
    """Few rows for large vocabularies (suite time), fewer under Triton's interpreter."""
    if vocab > 10_000:
        return 2 if slow else 3
    return 5 if slow else 37


def logits(shape, dtype, gen, kind: str = "random", device: str = "cpu") -> torch.Tensor:
    """random: N(0, 2^2); peaked: one column per row 18-30 above the rest (p_max ~ 1: confident rows); wide:
    N(0, 6^2) (large |lse|)."""
    scale = {"random": 2.0, "peaked": 2.0, "wide": 6.0}[kind]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    if kind == "peaked":
        flat = x.view(-1, shape[-1])
        top = torch.randint(0, shape[-1], (flat.shape[0],), generator=gen)
        flat[torch.arange(flat.shape[0]), top] += 18 + 12 * torch.rand(flat.shape[0], generator=gen, dtype=torch.float64)
    return x.to(dtype).to(device)


def tokens_for(x: torch.Tensor, gen, peaked_share: float = 0.5) -> torch.Tensor:
    """Token ids: half the argmax of each row (the confident case: logp ~ 0, 1 - p tiny), half uniform."""
    vocab = x.shape[-1]
    uniform = torch.randint(0, vocab, x.shape[:-1], generator=gen)
    take_max = torch.rand(x.shape[:-1], generator=gen) < peaked_share
    return torch.where(take_max, x.float().argmax(-1).cpu(), uniform).to(x.device)


def near_teacher(student: torch.Tensor, gen, noise: float = 1e-3) -> torch.Tensor:
    """A teacher whose logits differ from the student's by ~noise (KL ~ noise^2: cancellation-prone)."""
    delta = torch.randn(student.shape, generator=gen, dtype=torch.float64) * noise
    return (student.double().cpu() + delta).to(student.dtype).to(student.device)


def max_err(got: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max abs error over the positions where the oracle is finite; NaN / inf positions must match exactly."""
    got, oracle = got.double().cpu(), oracle.double().cpu()
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isnan(got), torch.isnan(oracle)), "NaN positions differ from the oracle"
    assert torch.equal(got[~finite & ~torch.isnan(oracle)], oracle[~finite & ~torch.isnan(oracle)]), "inf differs"
    if not finite.any():
        return 0.0
    return float((got[finite] - oracle[finite]).abs().max())


def assert_within_rule(got, oracle, torch32, what: str, backend=None, extra_rounding: bool = False) -> None:
    """The tolerance rule of this file's docstring. A bf16 result of a backend that truncates to bf16 (Triton's
    interpreter) may be one bf16 ulp (2^-7 relative) off, where a rounding store is half an ulp off.
    ``extra_rounding``: ``got`` was rounded to its dtype one more time than PyTorch's result (the in-place backward
    stores the unit gradient in the logits' dtype, then scales and rounds again): half an ulp of that dtype at the
    largest value is allowed on top."""
    err, ref_err = max_err(got, oracle), max_err(torch32, oracle)
    finite = oracle.double()[torch.isfinite(oracle.double())]
    floor = EPS32 * max(1.0, float(finite.abs().max())) if finite.numel() else 0.0
    if extra_rounding and finite.numel():
        floor += torch.finfo(got.dtype).eps / 2 * float(finite.abs().max())
    if backend is not None and backend.truncates_bf16 and got.dtype == torch.bfloat16 and finite.numel():
        floor += 2.0**-7 * float(finite.abs().max())
    assert err <= 2 * ref_err + floor, (f"{what}: error {err:.3e} > 2 x PyTorch fp32 error {ref_err:.3e} "
                                        f"+ floor {floor:.1e}")


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def grad_of(fn, base: torch.Tensor, upstreams, dtype=None, view=identity) -> torch.Tensor:
    """d/dbase sum_i upstream_i . out_i of fn(view(base)) (fn returns a tensor or a tuple), base cast to ``dtype``
    first; ``view`` keeps a non-contiguous layout in the autograd graph (a clone of a view would not)."""
    leaf = base.detach().clone().requires_grad_()
    out = fn(view(leaf if dtype is None else leaf.to(dtype)))
    out = out if isinstance(out, tuple) else (out,)
    total = sum((o * u.to(o.dtype)).sum() for o, u in zip(out, upstreams))
    (grad,) = torch.autograd.grad(total, leaf)
    return grad
