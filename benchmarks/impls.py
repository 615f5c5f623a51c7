"""What gets timed: the opd_kernels backends and the baselines users have today, for each op and mode.

Implementations (``--backends``):
- ``cpp`` / ``cuda`` / ``triton`` / ``torch``: the public ``opd_kernels`` op under ``use_backend(name)``.
- ``naive``: textbook PyTorch, ``log_softmax(x.float()).gather(...)``; for the KL the two-``log_softmax`` formula
  ``sum(p_s * (log p_s - log p_t))``. Pinned here (not imported) so the baseline cannot drift.
- ``chunked``: the same math over row chunks of CHUNK_BYTES of fp32 (no [T, V] temporary); fwd+bwd through an
  autograd Function that saves the row log-sum-exp and recomputes the softmax per chunk in backward: what a
  careful PyTorch user writes.
- ``compile``: ``torch.compile(naive, dynamic=False)`` compiled afresh for every case (``torch._dynamo.reset()``)
  so no recompile limit or earlier shape leaks in; its first-call (compile) time is recorded separately.
- ``liger``: Liger-Kernel's matching ops when installed (GPU only): per-token cross entropy
  (``reduction="none"``, log-prob = -loss) and, for the KL, ``liger_jsd(beta=1)`` (= reverse KL) over two
  ``log_softmax`` outputs, which returns the batch mean (a scalar), not per-row values.
All run at temperature 1 (the kernels take 1/T as a scalar, so T does not change the traffic).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

OPD_BACKENDS = ("cpp", "cuda", "triton", "torch")
BASELINES = ("naive", "chunked", "compile", "liger")
IMPLS = OPD_BACKENDS + BASELINES
DEFAULT_IMPLS = {"cpu": ("cpp", "naive", "chunked", "compile"),
                 "cuda": ("cuda", "triton", "naive", "chunked", "compile", "liger")}
# fp32 bytes of one row chunk of the chunked baseline, per device: cache-sized on CPU (best of 0.25/1/4/16 MiB on
# the team's 2-core machine, 1 thread); large on GPU, where every chunk costs a few kernel launches.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
OPD_COEF = 0.5          # opd_advantages coefficient (any value: it does not change the traffic)


# ------------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    student: torch.Tensor             # (T, V) logits dtype
    teacher: torch.Tensor | None      # (T, V) logits dtype, only when an op needs it
    tokens: torch.Tensor              # (T,) int64 sampled tokens
    teacher_logprobs: torch.Tensor    # (T,) fp32
    advantages: torch.Tensor          # (T,) fp32
    mask: torch.Tensor                # (T,) bool, ~90% ones
    grad_out: torch.Tensor            # (T,) fp32 upstream gradient for fwd+bwd (non-uniform)
    seed: int

    def refill(self) -> None:
        """Rewrite the logits with their original values (Liger's cross entropy writes its gradient into its
        input)."""
        _fill_logits(self.student, self.seed)
        if self.teacher is not None:
            _fill_logits(self.teacher, self.seed, noise=0.5)


def _fill_logits(x: torch.Tensor, seed: int, noise: float = 0.0) -> None:
    # Random rows of std 2 (LM-like spread), generated as one block of <= 256 rows and tiled: generating 10^9
    # normals would take minutes on a CPU, and repeated rows change nothing for a memory-bound pass (a block
    # is far larger than any cache). The teacher is the student plus noise: a near-identical pair.
    T, V = x.shape
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = min(T, 256)
    block = 2.0 * torch.randn(rows, V, generator=gen, device=x.device)
    if noise:
        block += noise * torch.randn(rows, V, generator=gen, device=x.device)
    for start in range(0, T, rows):
        stop = min(T, start + rows)
        x[start:stop].copy_(block[: stop - start])


def make_inputs(T: int, V: int, dtype: torch.dtype, device: torch.device, *, with_teacher: bool,
                seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    student = torch.empty(T, V, dtype=dtype, device=device)
    teacher = torch.empty(T, V, dtype=dtype, device=device) if with_teacher else None
    inputs = Inputs(
        student=student, teacher=teacher,
        tokens=torch.randint(0, V, (T,), generator=gen, device=device),
        teacher_logprobs=-torch.rand(T, generator=gen, device=device) * 8.0,
        advantages=torch.randn(T, generator=gen, device=device),
        mask=torch.rand(T, generator=gen, device=device) > 0.1,
        grad_out=torch.randn(T, generator=gen, device=device),
        seed=seed)
    inputs.refill()
    return inputs


# ------------------------------------------------------------------------------------------- naive (textbook)
def naive_token_logprobs(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _opd_epilogue(logp, advantages, teacher_logprobs, mask, coef):
    kl = torch.where(mask, logp - teacher_logprobs, torch.zeros_like(logp))  # k1
    return advantages - coef * kl, kl, torch.where(mask, logp, torch.zeros_like(logp))


def naive_opd_advantages(x, tokens, advantages, teacher_logprobs, mask, coef: float = OPD_COEF):
    return _opd_epilogue(naive_token_logprobs(x, tokens), advantages, teacher_logprobs, mask, coef)


def naive_reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    ls = torch.log_softmax(student.float(), dim=-1)
    lt = torch.log_softmax(teacher.float(), dim=-1)
    return (ls.exp() * (ls - lt)).sum(-1)


# ---------------------------------------------------------------------------------------------- row-chunked
def _chunks(T: int, V: int, device: torch.device):
    rows = max(1, CHUNK_BYTES[device.type] // (4 * V))
    return [(s, min(T, s + rows)) for s in range(0, T, rows)]


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tokens):
        T, V = x.shape
        logp = torch.empty(T, dtype=torch.float32, device=x.device)
        lse = torch.empty(T, dtype=torch.float32, device=x.device)
        for s, e in _chunks(T, V, x.device):
            xc = x[s:e].float()                                    # (rows, V)
            lse[s:e] = torch.logsumexp(xc, dim=-1)
            logp[s:e] = xc.gather(-1, tokens[s:e, None]).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(x, tokens, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        x, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(x)
        for s, e in _chunks(*x.shape, x.device):
            g = grad_logp[s:e, None]
            gc = torch.exp(x[s:e].float() - lse[s:e, None]).mul_(-g)   # -g * softmax
            gc.scatter_add_(-1, tokens[s:e, None], g)                  # + g * onehot
            grad[s:e] = gc
        return grad, None


class _ChunkedReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_logits, t_logits):
        T, V = s_logits.shape
        kl = torch.empty(T, dtype=torch.float32, device=s_logits.device)
        lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
        for s, e in _chunks(T, V, s_logits.device):
            xs, xt = s_logits[s:e].float(), t_logits[s:e].float()
            lse_s[s:e], lse_t[s:e] = torch.logsumexp(xs, -1), torch.logsumexp(xt, -1)
            ls, lt = xs - lse_s[s:e, None], xt - lse_t[s:e, None]
            kl[s:e] = (ls.exp() * (ls - lt)).sum(-1)
        ctx.save_for_backward(s_logits, t_logits, lse_s, lse_t, kl)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        s_logits, t_logits, lse_s, lse_t, kl = ctx.saved_tensors
        grad = torch.empty_like(s_logits)
        for s, e in _chunks(*s_logits.shape, s_logits.device):
            ls = s_logits[s:e].float() - lse_s[s:e, None]
            lt = t_logits[s:e].float() - lse_t[s:e, None]
            # d KL / d logits_s = p_s * (log p_s - log p_t - KL)
            grad[s:e] = ls.exp() * (ls - lt - kl[s:e, None]) * grad_kl[s:e, None]
        return grad, None


def chunked_token_logprobs(x, tokens):
    return _ChunkedLogprob.apply(x, tokens)


def chunked_opd_advantages(x, tokens, advantages, teacher_logprobs, mask, coef: float = OPD_COEF):
    return _opd_epilogue(chunked_token_logprobs(x, tokens), advantages, teacher_logprobs, mask, coef)


def chunked_reverse_kl(student, teacher):
    return _ChunkedReverseKL.apply(student, teacher)


# ---------------------------------------------------------------------------------------------- availability
def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """None when ``impl`` can run on ``device`` here, else the reason (recorded in the skipped row)."""
    if impl in OPD_BACKENDS:
        from opd_kernels import _backend
        if not _backend.available(impl, device.type):
            return _backend.why_unavailable(impl, device.type)
        return None
    if impl == "liger":
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA tensors only"
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except ImportError as exc:
            return f"Liger-Kernel is not installed ({exc}); pip install liger-kernel"
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    return None


# ------------------------------------------------------------------------------------------------ builders
def _forward_fn(impl: str, op: str, inputs: Inputs) -> Callable[[torch.Tensor], object]:
    """f(student_logits) -> the op's output(s), for ``impl``; the other inputs are bound from ``inputs``."""
    i = inputs
    if impl in OPD_BACKENDS:
        return _opd_kernels_fn(impl, op, i)
    if impl == "liger":
        return _liger_fn(op, i)
    table = {"naive": (naive_token_logprobs, naive_opd_advantages, naive_reverse_kl),
             "compile": (naive_token_logprobs, naive_opd_advantages, naive_reverse_kl),
             "chunked": (chunked_token_logprobs, chunked_opd_advantages, chunked_reverse_kl)}[impl]
    tok_fn, opd_fn, kl_fn = table
    if impl == "compile":
        torch._dynamo.reset()
        tok_fn, opd_fn, kl_fn = (torch.compile(f, dynamic=False) for f in table)
    if op == "token_logprobs":
        return lambda x: tok_fn(x, i.tokens)
    if op == "opd_advantages":
        return lambda x: opd_fn(x, i.tokens, i.advantages, i.teacher_logprobs, i.mask)
    return lambda x: kl_fn(x, i.teacher)


def _opd_kernels_fn(backend: str, op: str, i: Inputs):
    import opd_kernels

    def run(x):
        with opd_kernels.use_backend(backend):
            if op == "token_logprobs":
                return opd_kernels.token_logprobs(x, i.tokens)
            if op == "opd_advantages":
                return tuple(opd_kernels.opd_advantages(x, i.tokens, i.advantages, teacher_logprobs=i.teacher_logprobs,
                                                        coef=OPD_COEF, kl="k1", mask=i.mask))
            return opd_kernels.reverse_kl(x, i.teacher)
    return run


def _liger_fn(op: str, i: Inputs):
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_jsd

    def logp(x):
        return -liger_cross_entropy(x, i.tokens, reduction="none").float()
    if op == "token_logprobs":
        return logp
    if op == "opd_advantages":
        return lambda x: _opd_epilogue(logp(x), i.advantages, i.teacher_logprobs, i.mask, OPD_COEF)
    # beta=1 is the reverse KL(input || target) with input = student log-probs; returns the batch mean
    return lambda x: liger_jsd(torch.log_softmax(x, -1, dtype=torch.float32),
                               torch.log_softmax(i.teacher, -1, dtype=torch.float32), beta=1.0)


def build(impl: str, op: str, mode: str, inputs: Inputs) -> Callable[[], object]:
    """A zero-argument callable running one case: fwd returns the output(s), fwd+bwd returns d/d logits."""
    f = _forward_fn(impl, op, inputs)
    x = inputs.student
    if mode == "fwd":
        return lambda: f(x)
    xg = x.detach().requires_grad_(True)
    g = inputs.grad_out

    def fwd_bwd():
        out = f(xg)
        upstream = g if out.dim() else torch.ones_like(out)  # a scalar (Liger's batch-mean KL) gets 1
        return torch.autograd.grad(out, xg, upstream)[0]
    return fwd_bwd


def reference(op: str, mode: str, inputs: Inputs, rows: int) -> torch.Tensor:
    """The float64 oracle (opd_kernels' ``*_reference``) on the first ``rows`` rows, shaped like
    :func:`comparable`'s output."""
    from opd_kernels.ops.opd_advantages import opd_advantages_reference
    from opd_kernels.ops.reverse_kl import reverse_kl_reference
    from opd_kernels.ops.token_logprobs import token_logprobs_reference
    i = inputs
    x = i.student[:rows].double().requires_grad_(mode == "fwd+bwd")
    with torch.enable_grad():
        if op == "token_logprobs":
            out = token_logprobs_reference(x, i.tokens[:rows])
        elif op == "opd_advantages":
            out = torch.stack(opd_advantages_reference(
                x, i.tokens[:rows], i.advantages[:rows].double(), teacher_logprobs=i.teacher_logprobs[:rows].double(),
                coef=OPD_COEF, kl="k1", mask=i.mask[:rows]))
        else:
            out = reverse_kl_reference(x, i.teacher[:rows].double())
        if mode == "fwd+bwd":
            return torch.autograd.grad(out, x, i.grad_out[:rows].double())[0]
    return out.detach()


def comparable(op: str, mode: str, result, rows: int) -> torch.Tensor | None:
    """The first ``rows`` rows of a case's result, or None when the result has no per-row values."""
    if mode == "fwd+bwd":
        return result[:rows]
    if op == "opd_advantages":
        return torch.stack([t[:rows] for t in result])
    return None if result.dim() == 0 else result[:rows]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (NaN anywhere gives inf)."""
    diff = (out.double().cpu() - ref.cpu()).abs().max().item()
    scale = ref.abs().max().item()
    return float("inf") if diff != diff else diff / max(scale, 1e-30)


def check(impl: str, op: str, mode: str, inputs: Inputs, result, rows: int) -> tuple[float, float] | None:
    """(relative error vs the float64 oracle on the first ``rows`` rows, tolerance), or None when the result
    has no per-row values (Liger's batch-mean KL). The tolerance catches wrong math, not last-bit precision
    (the kernel tests do that): 1e-3, or 2e-2 where the result is rounded to a 16-bit dtype (gradients of
    16-bit logits; Liger's per-token loss, stored in the logits dtype)."""
    out = comparable(op, mode, result, rows)
    if out is None:
        return None
    low_precision = inputs.student.dtype != torch.float32 and (mode == "fwd+bwd" or impl == "liger")
    return relative_error(out, reference(op, mode, inputs, rows)), 2e-2 if low_precision else 1e-3


def estimated_extra_bytes(impl: str, op: str, mode: str, T: int, V: int, elt: int) -> int:
    """The temporaries a case allocates (peak, in fp32 [T, V] units measured by this sweep on CPU, + 10%), to
    skip rather than crash on cases that cannot fit."""
    low = elt != 4
    if impl == "naive":
        k = {("token_logprobs", "fwd"): 2 if low else 1, ("token_logprobs", "fwd+bwd"): 2.5 if low else 2,
             ("opd_advantages", "fwd"): 2 if low else 1, ("reverse_kl", "fwd"): 5,
             ("reverse_kl", "fwd+bwd"): 4.5 if low else 4}[(op, mode)]
    elif impl == "compile":
        k = 1 if (op, mode) == ("token_logprobs", "fwd+bwd") else 0.05
    elif impl == "liger":
        k = 3 if op == "reverse_kl" else 1
    else:
        k = 0.25
    grad = T * V * elt if mode == "fwd+bwd" else 0
    return int(1.1 * k * T * V * 4) + grad + (64 << 20)
