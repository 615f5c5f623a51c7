"""inplace_backward=True (token_logprobs, reverse_kl) and the no-autograd in-place gradient functions: gradients
against the float64 oracle and the default path on every backend, the buffer really reused (same storage, no
[N, V] allocation), clear errors, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opd_kernels as ok
from opd_kernels.ops import _inplace, reverse_kl as rk, token_logprobs as tl
from opd_kernels.ops.reverse_kl import reverse_kl_reference as kl_reference
from opd_kernels.ops.token_logprobs import token_logprobs_reference as lp_reference
from ops_util import DTYPES, assert_within_rule, logits, near_teacher, rows_for, tokens_for

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings in Triton's interpreter


def _inplace_grad(fn, base, upstream, dtype=None):
    """(outputs, d/dbase sum(upstream * out[0])) through a non-leaf buffer that fn may overwrite. Its gradient is
    rounded to the buffer's dtype twice (unit gradient, then scaled): the tests allow that one extra rounding."""
    leaf = base.detach().clone().requires_grad_()
    buffer = leaf * 1 if dtype is None else leaf.to(dtype) * 1  # the trainer's case: logits out of a matmul
    out = fn(buffer)
    out = out if isinstance(out, tuple) else (out,)
    (grad,) = torch.autograd.grad((out[0] * upstream).sum(), leaf)
    return out, grad


def _default_grad(fn, base, upstream, dtype=None):
    leaf = base.detach().clone().requires_grad_()
    out = fn(leaf if dtype is None else leaf.to(dtype))
    out = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad((out[0] * upstream).sum(), leaf)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (32000, 1031, 7, 1))
def test_token_logprobs_gradient_matches_oracle(backend, vocab, dtype, gen):
    backend.require_float64_lse()
    n = rows_for(vocab, backend.slow)
    for kind, temperature in (("random", 1.0), ("peaked", 0.7), ("wide", 1.6)):
        x = logits((n, vocab), dtype, gen, kind, backend.device)
        tokens = tokens_for(x, gen)
        tokens[n // 2] = -100
        up = torch.randn(n, generator=gen).to(x.device)
        run = lambda v: ok.token_logprobs(v, tokens, temperature=temperature, return_entropy=True,  # noqa: E731
                                          inplace_backward=True)
        (logp, entropy), grad = _inplace_grad(run, x, up)
        assert not entropy.requires_grad and grad.dtype == dtype
        ref = lambda v: lp_reference(v, tokens, temperature=temperature)  # noqa: E731
        what = f"{kind} T={temperature} V={vocab}"
        assert_within_rule(logp.detach(), ref(x.double()), ref(x.float()), f"{what} logp", backend)
        assert_within_rule(grad, _default_grad(ref, x.double(), up), _default_grad(ref, x, up, torch.float32),
                           f"{what} grad", backend, extra_rounding=True)
        assert torch.all(grad[n // 2] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (32000, 1031, 7))
def test_reverse_kl_gradient_matches_oracle(backend, vocab, dtype, gen):
    backend.require_float64_lse()
    n = rows_for(vocab, backend.slow)
    for kind, temperature in (("random", 1.0), ("peaked", 0.8)):
        x = logits((n, vocab), dtype, gen, kind, backend.device)
        for teacher in (near_teacher(x, gen), logits((n, vocab), torch.bfloat16, gen, kind, backend.device)):
            mask = (torch.rand(n, generator=gen) > 0.3).to(x.device)
            mask[0] = False
            up = torch.randn(n, generator=gen).to(x.device)
            run = lambda v: ok.reverse_kl(v, teacher, temperature=temperature, mask=mask,  # noqa: E731
                                          inplace_backward=True)
            (kl,), grad = _inplace_grad(run, x, up)
            ref = lambda v: kl_reference(v, teacher.double(), temperature=temperature, mask=mask)  # noqa: E731
            ref32 = lambda v: kl_reference(v, teacher.float(), temperature=temperature, mask=mask)  # noqa: E731
            what = f"{kind} T={temperature} V={vocab} teacher {teacher.dtype}"
            assert_within_rule(kl.detach(), ref(x.double()), ref32(x.float()), f"{what} kl", backend)
            assert_within_rule(grad, _default_grad(ref, x.double(), up), _default_grad(ref32, x, up, torch.float32),
                               f"{what} grad", backend, extra_rounding=True)
            assert torch.all(grad[~mask] == 0)


def test_same_values_as_the_default_path(backend, gen):
    """fp32: the in-place gradient is the default path's to a few ulps (same kernels, one extra rounding)."""
    x = logits((2, 5, 1031), torch.float32, gen, "peaked", backend.device)
    teacher = near_teacher(x, gen, 0.3)
    tokens = tokens_for(x, gen)
    up = torch.randn(2, 5, generator=gen).to(x.device)
    for fn in (lambda v, **k: ok.token_logprobs(v, tokens, temperature=0.9, **k),
               lambda v, **k: ok.reverse_kl(v, teacher, temperature=0.9, **k)):
        (out,), grad = _inplace_grad(lambda v: fn(v, inplace_backward=True), x, up)  # noqa: B023
        assert torch.equal(out, fn(x))
        torch.testing.assert_close(grad, _default_grad(fn, x, up), rtol=1e-6, atol=1e-7)


class _BigAllocations(TorchDispatchMode):
    """Records every tensor the dispatcher creates with at least ``limit`` elements (outputs of any op)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit and t._base is None:
                if not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() ==
                           t.untyped_storage().data_ptr() for a in args):  # in-place ops return their input
                    self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("op", ("token_logprobs", "reverse_kl"))
def test_buffer_is_the_gradient_and_nothing_of_size_n_v_is_allocated(backend, op, gen):
    n, vocab = (8, 3001) if backend.slow else (64, 32000)
    x = logits((n, vocab), torch.float32, gen, "random", backend.device)
    teacher, tokens = near_teacher(x, gen, 0.5), tokens_for(x, gen)
    buffer = x.clone().requires_grad_()
    call = {"token_logprobs": lambda: ok.token_logprobs(buffer, tokens, return_entropy=True, inplace_backward=True),
            "reverse_kl": lambda: ok.reverse_kl(buffer, teacher, inplace_backward=True)}[op]
    up = torch.randn(n, generator=gen).to(x.device)
    with _BigAllocations(n * vocab // 2) as probe:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad((out * up).sum(), buffer)
    assert probe.seen == [], f"tensors of size ~[N, V] were allocated: {probe.seen}"
    assert grad.data_ptr() == buffer.data_ptr()
    with _BigAllocations(n * vocab // 2) as probe:  # the probe does see the default path's gradient
        torch.autograd.grad((ok.token_logprobs(x.clone().requires_grad_(), tokens) * up).sum(), buffer, allow_unused=True)
    assert probe.seen


def test_unusable_buffers_are_refused(gen):
    base = logits((3, 4, 50), torch.float32, gen)
    tokens = torch.zeros(3, 4, dtype=torch.long)
    teacher = base[0, 0].clone()
    views = {"expanded": base[:1].expand(3, 4, 50), "vocabulary stride 2": base.repeat(1, 1, 2)[..., ::2],
             "seq-first transpose": base.transpose(0, 1), "LM shift of 3 sequences": base[:, :-1]}
    for what, view in views.items():
        leaf = view.detach().requires_grad_()
        with pytest.raises(ValueError, match="inplace_backward"):
            ok.token_logprobs(leaf, torch.zeros(leaf.shape[:-1], dtype=torch.long), inplace_backward=True)
        with pytest.raises(ValueError, match="inplace_backward"):
            ok.reverse_kl(leaf, teacher.expand(leaf.shape).clone(), inplace_backward=True)
        assert torch.equal(view, views[what]), f"{what}: the refused buffer was modified"
    one_sequence = base[:1].clone()[:, :-1].detach().requires_grad_()  # one sequence: rows at one stride, accepted
    ok.token_logprobs(one_sequence, tokens[:1, :-1], inplace_backward=True).sum().backward()


def test_modified_buffer_is_detected_in_the_backward(gen):
    x = logits((4, 70), torch.float32, gen).requires_grad_()
    buffer = x * 1
    logp = ok.token_logprobs(buffer, torch.zeros(4, dtype=torch.long), inplace_backward=True)
    buffer.add_(1)
    with pytest.raises(RuntimeError, match="modified after the forward"):
        logp.sum().backward()


def test_buffer_needed_by_another_backward_is_detected(gen):
    """exp saves its output for its backward: overwriting it must not silently corrupt that gradient (the
    custom op declares the mutation, so autograd's version check raises)."""
    leaf = logits((4, 70), torch.float32, gen).requires_grad_()
    buffer = torch.exp(leaf)
    logp = ok.token_logprobs(buffer, torch.zeros(4, dtype=torch.long), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_no_gradient_needed_leaves_the_buffer_alone(gen):
    x = logits((4, 70), torch.float32, gen)
    before = x.clone()
    with torch.no_grad():
        ok.token_logprobs(x.requires_grad_(), torch.zeros(4, dtype=torch.long), inplace_backward=True)
    ok.reverse_kl(x.detach(), before, inplace_backward=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize("block_rows", [None, 2], ids=["one_block", "blocks_of_2_rows"])
def test_low_level_functions_equal_the_backwards(backend, gen, block_rows, monkeypatch):
    """The no-autograd pieces for a chunk: fwd_grad_ (one pass, upstream known) and grad_inplace_ (global scalars,
    entropy gradient and the combined log-prob + KL form included, in one row block or several) equal the default
    backwards."""
    n, vocab = 6, 3001
    if block_rows is not None:
        monkeypatch.setattr(_inplace, "_BLOCK_ELEMENTS", block_rows * vocab)
    x = logits((n, vocab), torch.float32, gen, "peaked", backend.device)
    teacher, tokens = near_teacher(x, gen, 0.5), tokens_for(x, gen)
    tokens[2] = -100
    g_lp, g_h, g_kl = (torch.randn(n, generator=gen).to(x.device) for _ in range(3))
    logp, entropy, lse = tl.token_logprobs_fwd(x, tokens, 0.8, 0, vocab, -100, True)
    kl32, lse_s, lse_t, _, kl = rk.kl_fwd(x, teacher, None, 0.8, 0, vocab, -100)
    grad_lp = tl.token_logprobs_bwd(x, tokens, g_lp, g_h, lse, entropy, 0.8, 0, -100)
    grad_kl = rk.kl_bwd(x, teacher, g_kl, lse_s, lse_t, kl, 0.8)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731

    buf = x.clone()
    out = tl.logprob_fwd_grad_(buf, tokens, g_lp, temperature=0.8, with_entropy=True)
    close(out[0], logp), close(out[1], entropy), close(out[2], lse)
    close(buf, tl.token_logprobs_bwd(x, tokens, g_lp, None, lse, entropy, 0.8, 0, -100))
    buf = x.clone()
    assert tl.logprob_grad_inplace_(buf, tokens, g_lp, lse, temperature=0.8, grad_entropy=g_h,
                                    entropy=entropy) is buf
    close(buf, grad_lp)
    buf = x.clone()
    out = rk.kl_fwd_grad_(buf, teacher, g_kl, temperature=0.8)
    close(out[0], kl), close(out[1], lse_s), close(out[2], lse_t)
    close(buf, grad_kl)
    buf = x.clone()
    rk.kl_grad_inplace_(buf, teacher, g_kl, lse_s, lse_t, kl, temperature=0.8)
    close(buf, grad_kl)
    buf = x.clone()
    rk.kl_grad_inplace_(buf, teacher, g_kl, lse_s, lse_t, kl, temperature=0.8, tokens=tokens, grad_logp=g_lp,
                        grad_entropy=g_h, entropy=entropy)
    close(buf, grad_lp + grad_kl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_scale_rounds_once(dtype, gen):
    """The backward's per-row scale (a C++ kernel for 16-bit CPU buffers): the fp32 product rounded once."""
    x = logits((5, 1031), dtype, gen)
    g = torch.randn(5, generator=gen)
    expected = (x.float() * g[:, None]).to(dtype)
    _inplace.scale_rows_op(x, g)
    assert torch.equal(x, expected)


def test_opcheck(backend, gen):
    x = torch.randn(3, 4, 37, generator=gen).to(backend.device)
    xt = torch.randn(3, 4, 37, generator=gen).to(backend.device)
    tokens = torch.randint(0, 37, (3, 4), generator=gen).to(backend.device)
    tokens[0, 1] = -100
    vec = lambda: torch.randn(3, 4, generator=gen).to(backend.device)  # noqa: E731
    lse = torch.logsumexp(x.double(), -1)
    calls = [(tl.token_logprobs_fwd_inplace, (x.clone(), tokens, None, 0.7, -100, True)),
             (tl.token_logprobs_fwd_inplace, (x.clone().bfloat16(), tokens, vec(), 1.0, -100, False)),
             (tl.token_logprobs_bwd_inplace, (x.clone(), tokens, vec(), vec(), lse, vec(), 1.0, 0, -100)),
             (tl.token_logprobs_bwd_inplace, (x.clone(), tokens, vec(), None, lse, x.new_empty(0), 0.7, 0, -100)),
             (rk.kl_fwd_inplace, (x.clone(), xt, None, 0.9)),
             (rk.kl_fwd_inplace, (x.clone(), xt.bfloat16(), vec(), 1.0)),
             (rk.kl_bwd_inplace, (x.clone(), xt, vec(), lse, lse + 0.1, lse.abs(), 0.9)),
             (_inplace.scale_rows_op, (x.clone(), vec())),
             (_inplace.scale_rows_op, (x.clone().bfloat16(), vec()))]
    for op, args in calls:
        torch.library.opcheck(op, args)


def _inplace_calls(h, w, xt, tokens, mask):
    logits = h @ w  # the trainer's case: a buffer autograd does not need (mm saves h and w)
    logp, entropy = ok.token_logprobs(logits, tokens, temperature=0.8, return_entropy=True, inplace_backward=True)
    student = h @ w
    kl = ok.reverse_kl(student, xt, temperature=0.8, mask=mask, inplace_backward=True)
    return logp, entropy, kl


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 6, 16, generator=gen), torch.randn(16, 50, generator=gen)
    xt = torch.randn(2, 6, 50, generator=gen)
    tokens = torch.randint(0, 50, (2, 6), generator=gen)
    tokens[1, 2] = -100
    mask = torch.rand(2, 6, generator=gen) > 0.3
    results = {}
    for name, fn in (("eager", _inplace_calls), ("compiled", torch.compile(_inplace_calls, fullgraph=True))):
        w_leaf = w.clone().requires_grad_()
        logp, entropy, kl = fn(h, w_leaf, xt, tokens, mask)
        (logp.sum() * 0.5 + (kl * torch.arange(6.0)).sum()).backward()
        results[name] = (logp, entropy, kl, w_leaf.grad)
    for got, expected in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Tensor parallel: 2 gloo ranks, each with half the vocabulary; the in-place shard gradient equals the default
# path's (the forward, the all-reduce, then a second in-place pass with the global scalars)
# ----------------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, init_file: str, backends: list[str]) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name in backends:
            with ok.use_backend(name):
                for dtype in (torch.float32, torch.bfloat16):
                    _tp_check(rank, dtype, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _tp_check(rank, dtype, group):
    gen = torch.Generator().manual_seed(5)
    half = 301
    x = logits((3, 4, 2 * half), dtype, gen, "peaked")
    teacher = near_teacher(x, gen, 0.3)
    tokens = tokens_for(x, gen)
    tokens[1, 2] = -100
    mask = torch.rand(3, 4, generator=gen) > 0.3
    up = torch.randn(3, 4, generator=gen)
    cols = slice(rank * half, (rank + 1) * half)
    for fn in (lambda v, t, **k: ok.token_logprobs(v, tokens, temperature=0.8, return_entropy=True, **k)[0],
               lambda v, t, **k: ok.reverse_kl(v, t, temperature=0.8, mask=mask, **k)):
        default = x[..., cols].clone().requires_grad_()
        out = fn(default, teacher[..., cols], process_group=group)
        (out * up).sum().backward()
        buffer = x[..., cols].clone().requires_grad_()
        out_ip = fn(buffer, teacher[..., cols], process_group=group, inplace_backward=True)
        (grad,) = torch.autograd.grad((out_ip * up).sum(), buffer)
        assert torch.equal(out_ip, out.detach()) and grad.data_ptr() == buffer.data_ptr()
        tol = 2e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(grad, default.grad, atol=tol, rtol=tol)


@pytest.mark.distributed
def test_tensor_parallel_equals_default_path(tmp_path):
    import torch.multiprocessing as mp  # noqa: PLC0415

    from opd_kernels import _backend  # noqa: PLC0415

    backends = [b for b in ("torch", "cpp", "triton") if _backend.available(b, "cpu")]
    mp.spawn(_tp_worker, args=(str(tmp_path / "rendezvous"), backends), nprocs=2, join=True)
