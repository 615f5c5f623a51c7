"""Direct tests of the CUDA row kernels (``torch.ops.opd_C.*`` on CUDA tensors, csrc/cuda) against the float64
oracle of the row contract, plus what is specific to the CUDA implementation: the split-vocabulary path for few
rows vs one block per row, misaligned row starts (scalar head / tail around 16-byte packs), mixed student /
teacher dtypes, 64-bit offsets, agreement with the Triton kernels, and input errors raised before any launch.

Runs only where a CUDA device and a CUDA build of opd_kernels._C exist (skipped with the reason otherwise). The
oracle helpers and the 2x tolerance rule are shared with test_triton_rows.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device on this machine (the CUDA kernels are compile-checked by tools/check_cuda.sh)",
                allow_module_level=True)

from opd_kernels import _backend  # noqa: E402

if not _backend.available("cuda", "cuda"):
    pytest.skip(f"CUDA row kernels unavailable: {_backend.why_unavailable('cuda', 'cuda')}", allow_module_level=True)

from test_triton_rows import (IGNORE, check_2x, check_64_bit_row_offsets, check_nan_and_skipped_rows,  # noqa: E402
                              contract_kl, contract_logprob, grad_oracle, make_logits, make_tokens)

C = torch.ops.opd_C
DEV = "cuda"
pytestmark = pytest.mark.gpu


def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def _check_logprob(x, tok, inv_t, what, vocab_start=0):
    logp, ent, lse = C.logprob_fwd(x, tok, inv_t, vocab_start, IGNORE, True)
    xc, tc = x.cpu(), tok.cpu()
    ref, t32 = contract_logprob(xc, tc, inv_t, vocab_start), contract_logprob(xc, tc, inv_t, vocab_start,
                                                                             dtype=torch.float32)
    keep = tc != IGNORE  # the lse of an ignored row is unspecified (the row is not read)
    check_2x(logp.cpu(), ref[0], t32[0], f"{what} logp")
    check_2x(ent.cpu(), ref[1], t32[1], f"{what} entropy")
    check_2x(lse.cpu()[keep], ref[2][keep], t32[2][keep], f"{what} lse")
    return logp, ent, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,v", [(1, 151936), (3, 151936), (700, 32000), (2, 128256), (64, 50257), (37, 1031),
                                 (5, 7), (4, 1)])
def test_logprob_matches_float64(n, v, dtype):
    """Covers both forward paths: n < 4 * SMs splits every row over blocks + a combine kernel, n >= 4 * SMs
    (700 rows on <= 175 SMs) is one block per row."""
    for kind, temp in (("random", 1.0), ("peaked", 0.7)):
        x = make_logits(n, v, dtype, kind, seed=n + v)
        tok = make_tokens(n, v, seed=n, ignore_rows=(1,) if n > 2 else ())
        logp, ent, lse = _check_logprob(x, tok, 1 / temp, f"{kind} T={temp}")
        up = (torch.randn(n, device=DEV), torch.randn(n, device=DEV))
        grad = C.logprob_bwd(x, tok, up[0], up[1], lse, ent, 1 / temp, 0, IGNORE)
        assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
        fn = lambda xd: contract_logprob(xd, tok.cpu(), 1 / temp, dtype=xd.dtype)[:2]  # noqa: E731
        upc = tuple(u.cpu() for u in up)
        check_2x(grad.cpu().float(), grad_oracle(fn, x.cpu(), upc, torch.float64),
                 grad_oracle(fn, x.cpu(), upc, torch.float32).to(dtype).float(), f"{kind} grad")
        if n > 2:
            assert torch.count_nonzero(grad[1]).item() == 0


def test_split_rows_equal_one_block_per_row():
    """The same row computed alone (split over blocks) and among 4 * SMs + 1 broadcast copies (one block each)."""
    v = 151936
    x = make_logits(1, v, torch.bfloat16, "peaked", seed=3)
    many = x.expand(4 * _sm_count() + 1, v)  # row stride 0: no memory
    tok1 = make_tokens(1, v, seed=3)
    one = C.logprob_fwd(x, tok1, 1.0, 0, IGNORE, True)
    all_rows = C.logprob_fwd(many, tok1.expand(many.shape[0]).contiguous(), 1.0, 0, IGNORE, True)
    for a, b in zip(one, all_rows):
        torch.testing.assert_close(b, a.expand_as(b), atol=2e-6, rtol=1e-6)
    xt = make_logits(1, v, torch.bfloat16, "random", seed=4)
    k1 = C.kl_fwd(x, xt, tok1, 1.0, 0, IGNORE)
    kn = C.kl_fwd(many, xt.expand_as(many), tok1.expand(many.shape[0]).contiguous(), 1.0, 0, IGNORE)
    for a, b in zip(k1, kn):
        torch.testing.assert_close(b, a.expand_as(b), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_rows_and_odd_vocab(dtype):
    """Row starts at every offset mod 16 bytes, odd row strides, a gradient row alignment that differs from x's."""
    base = make_logits(9, 5000, dtype, "random", seed=9)
    for shift in range(8):
        x = base[:, shift:shift + 4093]  # row stride 5000, V = 4093 (odd), start misaligned by `shift` elements
        tok = make_tokens(9, 4093, seed=shift, ignore_rows=(4,))
        logp, ent, lse = _check_logprob(x, tok, 1.0, f"shift {shift}")
        dense = C.logprob_fwd(x.contiguous(), tok, 1.0, 0, IGNORE, True)
        for a, b in zip((logp, ent, lse), dense):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        up = torch.randn(9, device=DEV)
        torch.testing.assert_close(C.logprob_bwd(x, tok, up, None, lse, ent, 1.0, 0, IGNORE),
                                   C.logprob_bwd(x.contiguous(), tok, up, None, lse, ent, 1.0, 0, IGNORE))
        xt = base.roll(1, 0)[:, 7 - shift:7 - shift + 4093]  # teacher misaligned differently: scalar walk
        k = C.kl_fwd(x, xt, tok, 1.0, 0, IGNORE)
        check_2x(k[0].cpu(), contract_kl(x.cpu(), xt.cpu(), 1.0), contract_kl(x.cpu(), xt.cpu(), 1.0,
                                                                             torch.float32), f"kl shift {shift}")
        g = C.kl_bwd(x, xt, up, k[1], k[2], k[0], 1.0)
        ref = grad_oracle(lambda xd: (contract_kl(xd, xt.cpu(), 1.0, xd.dtype),), x.cpu(), (up.cpu(),),
                          torch.float64)
        t32 = grad_oracle(lambda xd: (contract_kl(xd, xt.cpu(), 1.0, xd.dtype),), x.cpu(), (up.cpu(),),
                          torch.float32)
        check_2x(g.cpu().float(), ref, t32.to(dtype).float(), f"kl grad shift {shift}")


@pytest.mark.parametrize("ds,dt", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                   (torch.float16, torch.float32), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("n,v", [(2, 151936), (600, 32000), (3, 1031)])
@pytest.mark.parametrize("relation", ["near", "unrelated"])
def test_kl_matches_float64(n, v, ds, dt, relation):
    """Confident students against a near-identical teacher (KL ~ 1e-4) and against an unrelated confident one
    (KL ~ 40: the backward's log p_s - log p_t - KL is a tiny difference of ~40s at the student's top column)."""
    xs = make_logits(n, v, torch.float32, "peaked", seed=v)
    if relation == "near":
        xt = (xs + 1e-2 * torch.randn(n, v, device=DEV)).to(dt)
    else:
        xt = make_logits(n, v, dt, "peaked", seed=v + 1)
    xs = xs.to(ds)
    tok = make_tokens(n, v, seed=v, ignore_rows=(2,) if n > 2 else ())
    kl, lse_s, lse_t, logp = C.kl_fwd(xs, xt, tok, 1 / 0.7, 0, IGNORE)
    xs_c, xt_c = xs.cpu(), xt.cpu()
    check_2x(kl.cpu(), contract_kl(xs_c, xt_c, 1 / 0.7), contract_kl(xs_c, xt_c, 1 / 0.7, torch.float32), "kl")
    ref, t32 = contract_logprob(xs_c, tok.cpu(), 1 / 0.7), contract_logprob(xs_c, tok.cpu(), 1 / 0.7,
                                                                            dtype=torch.float32)
    check_2x(logp.cpu(), ref[0], t32[0], "logp_s")
    check_2x(lse_s.cpu(), ref[2], t32[2], "lse_s")
    up = torch.linspace(-1, 1, n, device=DEV)
    grad = C.kl_bwd(xs, xt, up, lse_s, lse_t, kl, 1 / 0.7)  # the fwd -> bwd chain (see test_triton_rows)
    assert grad.dtype == ds and grad.shape == xs.shape
    fn = lambda xd: (contract_kl(xd, xt_c, 1 / 0.7, xd.dtype),)  # noqa: E731
    check_2x(grad.cpu().float(), grad_oracle(fn, xs_c, (up.cpu(),), torch.float64),
             grad_oracle(fn, xs_c, (up.cpu(),), torch.float32).to(ds).float(), "kl grad")
    assert torch.equal(C.kl_fwd(xs, xs.clone(), None, 1 / 0.7, 0, IGNORE)[0], torch.zeros_like(kl))


def test_vocab_shard_offsets():
    n, v, cut = 50, 32000, 12345
    x = make_logits(n, v, torch.bfloat16, "peaked", seed=5)
    tok = make_tokens(n, v, seed=5, ignore_rows=(7,))
    for lo, hi in ((0, cut), (cut, v)):
        _check_logprob(x[:, lo:hi], tok, 0.9, f"shard [{lo}, {hi})", vocab_start=lo)


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_opd_epilogues_match_triton_and_composition(kind):
    """The fused epilogues give what the core kernels + the epilogue formulas give, and what Triton gives."""
    tk = pytest.importorskip("opd_kernels.triton")
    n, v = 300, 50257
    x = make_logits(n, v, torch.bfloat16, "peaked", seed=kind)
    xt = make_logits(n, v, torch.bfloat16, "random", seed=kind + 10)
    tok = make_tokens(n, v, seed=kind)
    adv = torch.randn(n, device=DEV)
    mask = torch.rand(n, device=DEV) > 0.2
    x[~mask] = float("nan")  # masked rows are not read
    lp_core = C.logprob_fwd(x, tok, 1.25, 0, IGNORE, False)[0]
    tlp = (lp_core - 1e-4 * torch.randn(n, device=DEV)).nan_to_num()
    out = C.opd_sampled_fwd(x, tok, adv, tlp, mask, 0.3, 1.25, kind)
    torch.testing.assert_close(out[2], torch.where(mask, lp_core, 0.0), rtol=0, atol=2e-6)
    d = out[2].double() - tlp.double()  # the epilogue is exact (fp64, expm1) given the kernel's own logp
    k = torch.where(mask, d if kind == 1 else 0.5 * d * d if kind == 2 else torch.expm1(-d) + d, 0.0)
    torch.testing.assert_close(out[1].double(), k, rtol=2e-7, atol=1e-30)
    torch.testing.assert_close(out[0].double(), adv.double() - 0.3 * k, rtol=2e-7, atol=1e-7)
    for a, b in zip(out, tk.opd_sampled_fwd(x, tok, adv, tlp, mask, 0.3, 1.25, kind)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    full = C.opd_full_fwd(x, xt, tok, adv, mask, 0.3, 1.0)
    kl_core = torch.where(mask, C.kl_fwd(x, xt, None, 1.0, 0, IGNORE)[0].float(), 0.0)
    torch.testing.assert_close(full[1], kl_core, rtol=1e-5, atol=2e-6)
    for a, b in zip(full, tk.opd_full_fwd(x, xt, tok, adv, mask, 0.3, 1.0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    assert torch.equal(full[0][~mask], adv[~mask]) and torch.isfinite(torch.stack(full)).all()


def test_agrees_with_triton_kernels():
    tk = pytest.importorskip("opd_kernels.triton")
    x = make_logits(257, 151936, torch.bfloat16, "peaked", seed=6)
    xt = make_logits(257, 151936, torch.bfloat16, "random", seed=7)
    tok = make_tokens(257, 151936, seed=6, ignore_rows=(0, 100))
    for a, b in zip(C.logprob_fwd(x, tok, 0.8, 0, IGNORE, True), tk.logprob_fwd(x, tok, 0.8, 0, IGNORE, True)):
        torch.testing.assert_close(a, b, atol=4e-6, rtol=1e-5)
    ka, kb = C.kl_fwd(x, xt, tok, 0.8, 0, IGNORE), tk.kl_fwd(x, xt, tok, 0.8, 0, IGNORE)
    for a, b in zip(ka, kb):
        torch.testing.assert_close(a, b, atol=4e-6, rtol=1e-5)
    up = torch.randn(257, device=DEV)
    torch.testing.assert_close(C.kl_bwd(x, xt, up, *ka[1:3], ka[0], 0.8), tk.kl_bwd(x, xt, up, *ka[1:3], ka[0], 0.8))


def test_nan_ignore_and_zero_gradient_rows():
    check_nan_and_skipped_rows(C)


def test_row_offsets_are_64_bit():
    check_64_bit_row_offsets(C)


def test_empty_and_bad_input():
    x = torch.empty(0, 32000, dtype=torch.bfloat16, device=DEV)
    tok = torch.empty(0, dtype=torch.int64, device=DEV)
    assert all(t.shape == (0,) for t in C.logprob_fwd(x, tok, 1.0, 0, IGNORE, True))
    assert all(t.shape == (0,) for t in C.kl_fwd(x, x, tok, 1.0, 0, IGNORE))
    x = make_logits(2, 10, torch.float32)
    tok = make_tokens(2, 10)
    with pytest.raises(ValueError, match="one value per row"):
        C.logprob_fwd(x, tok[:1], 1.0, 0, IGNORE, False)
    with pytest.raises(TypeError, match="Long"):
        C.logprob_fwd(x, tok.int(), 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="inv_temperature"):
        C.logprob_fwd(x, tok, float("inf"), 0, IGNORE, False)
    with pytest.raises(ValueError, match="differ in shape"):
        C.kl_fwd(x, x[:, :9], None, 1.0, 0, IGNORE)
    with pytest.raises(ValueError, match="empty vocabulary"):
        C.logprob_fwd(x[:, :0], tok, 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="kl_kind"):
        C.opd_sampled_fwd(x, tok, tok.float(), tok.float(), None, 1.0, 1.0, 5)
    with pytest.raises(ValueError, match="lse is on cpu"):
        C.logprob_bwd(x, tok, tok.float(), None, tok.double().cpu(), tok.float(), 1.0, 0, IGNORE)
