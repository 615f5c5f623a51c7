"""Direct tests of the Triton row kernels (opd_kernels.triton) against a float64 oracle of the row contract.

On a machine without a GPU they run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before
the @triton.jit functions are defined, so this module sets it at import (collection) time and reloads the
package if something imported it earlier without the interpreter. With a GPU they run on CUDA tensors.

Tolerance rule (issue 2): a kernel's max error against the float64 oracle may be at most twice the error of
PyTorch's own fp32 path on the same input (with a floor of one fp32 ulp of the largest value).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import opd_kernels.triton as tk  # noqa: E402
from opd_kernels.triton import _common, kl as tkl, logprob as tlp  # noqa: E402

if not torch.cuda.is_available() and not tk.interpreting():
    for _name in ("_common", "logprob", "kl", "__init__"):
        _mod = sys.modules["opd_kernels.triton" + ("" if _name == "__init__" else "." + _name)]
        importlib.reload(_mod)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
IGNORE = -100
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings of untaken tl.where arms


# ------------------------------------------------------------------------------------------------------------
# oracle of the row contract (float64) and PyTorch's own fp32 path (same formulas in fp32)
# ------------------------------------------------------------------------------------------------------------

def contract_logprob(x, tokens, inv_t, vocab_start=0, ignore=IGNORE, dtype=torch.float64):
    z = x.to(dtype) * inv_t
    lp = torch.log_softmax(z, -1)
    col = tokens - vocab_start
    own = (tokens != ignore) & (col >= 0) & (col < x.shape[1])
    logp = torch.where(own, lp.gather(1, col.clamp(0, x.shape[1] - 1)[:, None])[:, 0], 0.0)
    p = lp.exp()
    ent = -torch.where(p > 0, p * lp, 0.0).sum(-1)
    return logp, torch.where(tokens != ignore, ent, 0.0), torch.logsumexp(z, -1)


def contract_kl(xs, xt, inv_t, dtype=torch.float64):
    ls = torch.log_softmax(xs.to(dtype) * inv_t, -1)
    lt = torch.log_softmax(xt.to(dtype) * inv_t, -1)
    p = ls.exp()
    return torch.where(p > 0, p * (ls - lt), 0.0).sum(-1)


def grad_oracle(fn, x, upstream, dtype):
    """d/dx of sum(upstream_i * fn(x)_i), computed in `dtype`."""
    xd = x.detach().to(dtype).requires_grad_()
    outs = fn(xd)
    total = sum((o * u.to(dtype)).sum() for o, u in zip(outs, upstream) if u is not None)
    (g,) = torch.autograd.grad(total, xd)
    return g


def check_2x(got, ref64, torch32, what):
    """max|got - ref| <= 2 * max(max|torch32 - ref|, one fp32 ulp of max|ref|)."""
    got, torch32 = got.double(), torch32.double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite pattern differs"
    if not finite.any():
        return
    err = (got - ref64)[finite].abs().max().item()
    err_t = (torch32 - ref64)[finite].abs().max().item()
    floor = EPS32 * max(1.0, ref64[finite].abs().max().item())
    assert err <= 2 * max(err_t, floor), f"{what}: error {err:.3g} > 2 x torch fp32 error {err_t:.3g}"


def make_logits(n, v, dtype, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3.0
    if kind == "peaked":  # confident rows: one logit far above the rest
        x[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += 25.0
    return x.to(dtype).to(DEV)


def make_tokens(n, v, seed=0, ignore_rows=()):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, v, (n,), generator=g)
    for r in ignore_rows:
        t[r] = IGNORE
    return t.to(DEV)


CASES = [  # (N, V, dtype, temperature, kind)
    (2, 151936, torch.bfloat16, 1.0, "random"),
    (1, 151936, torch.float32, 0.7, "peaked"),
    (1, 128256, torch.float16, 1.0, "peaked"),
    (2, 50257, torch.float32, 1.3, "random"),
    (3, 32000, torch.bfloat16, 0.7, "peaked"),
    (5, 1003, torch.float16, 0.7, "random"),
    (4, 7, torch.float32, 1.0, "peaked"),
    (3, 1, torch.bfloat16, 2.0, "random"),
]


def _id(case):
    n, v, dt, t, kind = case
    return f"N{n}-V{v}-{str(dt).split('.')[-1]}-T{t}-{kind}"


# ------------------------------------------------------------------------------------------------------------
# logprob_fwd / logprob_bwd
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_id)
def test_logprob_fwd_matches_float64(case):
    n, v, dtype, temp, kind = case
    x = make_logits(n, v, dtype, kind)
    tok = make_tokens(n, v, ignore_rows=(2,) if n > 2 else ())
    inv_t = 1.0 / temp
    logp, ent, lse = tk.logprob_fwd(x, tok, inv_t, 0, IGNORE, True)
    assert logp.dtype == ent.dtype == torch.float32 and lse.dtype == torch.float64 and logp.shape == (n,)
    ref = contract_logprob(x.cpu(), tok.cpu(), inv_t)
    t32 = contract_logprob(x.cpu(), tok.cpu(), inv_t, dtype=torch.float32)
    keep = tok.cpu() != IGNORE  # the lse of an ignored row is unspecified (the row is not read)
    for got, r, t, name in zip((logp, ent, lse[keep]), ref[:2] + (ref[2][keep],), t32[:2] + (t32[2][keep],),
                               ("logp", "entropy", "lse")):
        check_2x(got.cpu(), r, t, name)
    if n > 2:
        assert logp[2].item() == 0.0 and ent[2].item() == 0.0  # ignored row
    logp2, ent2, lse2 = tk.logprob_fwd(x, tok, inv_t, 0, IGNORE, False)
    assert ent2.shape == (0,) and torch.equal(logp2, logp) and torch.equal(lse2, lse)


@pytest.mark.parametrize("case", CASES[::2] + [CASES[5]], ids=_id)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprob_bwd_matches_float64(case, with_entropy):
    n, v, dtype, temp, kind = case
    x = make_logits(n, v, dtype, kind, seed=3)
    tok = make_tokens(n, v, seed=3, ignore_rows=(1,) if n > 1 else ())
    inv_t = 1.0 / temp
    g = torch.Generator().manual_seed(7)
    up = (torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV) if with_entropy else None)
    logp, ent, lse = tk.logprob_fwd(x, tok, inv_t, 0, IGNORE, with_entropy)
    grad = tk.logprob_bwd(x, tok, up[0], up[1], lse, ent, inv_t, 0, IGNORE)
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()

    def fn(xd):
        lp, h, _ = contract_logprob(xd, tok.cpu(), inv_t, dtype=xd.dtype)
        return lp, h

    upc = tuple(u.cpu() if u is not None else None for u in up)
    ref = grad_oracle(fn, x.cpu(), upc, torch.float64)
    t32 = grad_oracle(fn, x.cpu(), upc, torch.float32).to(dtype)
    check_2x(grad.cpu().float(), ref, t32.float(), "grad_x")
    if n > 1:
        assert torch.count_nonzero(grad[1]).item() == 0  # ignored row: exactly zero


def test_logprob_vocab_shards_combine_to_full():
    """Shard-local outputs (vocab_start > 0, out-of-shard tokens give 0) combine to the full-vocabulary values
    with the contract's per-row all-reduce formulas."""
    n, v, cut = 6, 1003, 417
    x = make_logits(n, v, torch.float32, "peaked", seed=5)
    tok = make_tokens(n, v, seed=5, ignore_rows=(4,))
    tok[0], tok[1] = cut - 1, cut  # the two tokens next to the shard boundary
    parts = [tk.logprob_fwd(x[:, :cut], tok, 0.8, 0, IGNORE, True),
             tk.logprob_fwd(x[:, cut:], tok, 0.8, cut, IGNORE, True)]
    col = tok.cpu()
    own0 = (col >= 0) & (col < cut)
    assert torch.all(parts[1][0].cpu()[own0] == 0) and torch.all(parts[0][0].cpu()[(col >= cut)] == 0)
    lse_r = torch.stack([p[2] for p in parts]).cpu().double()
    lse = torch.logsumexp(lse_r, 0)
    w = (lse_r - lse).exp()
    logp = sum(torch.where(p[0].cpu() != 0, p[0].cpu().double() + lr - lse, 0.0) for p, lr in zip(parts, lse_r))
    ent = lse - (w * (lse_r - torch.stack([p[1] for p in parts]).cpu().double())).sum(0)
    ent = torch.where(col != IGNORE, ent, 0.0)
    ref_logp, ref_ent, ref_lse = contract_logprob(x.cpu(), col, 0.8)
    keep = col != IGNORE
    torch.testing.assert_close(lse[keep], ref_lse[keep], atol=2e-6, rtol=0)
    torch.testing.assert_close(logp, ref_logp, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=0)
    # backward of a shard with the GLOBAL lse / entropy equals that shard's slice of the full gradient
    up = torch.linspace(-1, 2, n).to(DEV)
    gx = tk.logprob_bwd(x[:, cut:], tok, up, up, lse.to(DEV), ent.float().to(DEV), 0.8, cut, IGNORE)
    full = tk.logprob_bwd(x, tok, up, up, ref_lse.to(DEV), ref_ent.float().to(DEV), 0.8, 0, IGNORE)
    torch.testing.assert_close(gx, full[:, cut:], atol=1e-6, rtol=1e-5)


def _strided_views(dtype):
    base = make_logits(9, 1100, dtype, "random", seed=11)
    return {
        "row-stride>V": base[::2, :1001],              # row stride 2200, V 1001
        "misaligned-start": base[1:6, 3:1004],          # first column not 16-B aligned
        "broadcast-row": base[3, :999].expand(4, 999),  # row stride 0
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_rows(dtype):
    for name, x in _strided_views(dtype).items():
        n, v = x.shape
        tok = make_tokens(n, v, seed=2)
        got = tk.logprob_fwd(x, tok, 1.0, 0, IGNORE, True)
        ref = tk.logprob_fwd(x.contiguous(), tok, 1.0, 0, IGNORE, True)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), name
        up = torch.randn(n).to(DEV)
        ga = tk.logprob_bwd(x, tok, up, up, got[2], got[1], 1.0, 0, IGNORE)
        gb = tk.logprob_bwd(x.contiguous(), tok, up, up, got[2], got[1], 1.0, 0, IGNORE)
        assert torch.equal(ga, gb), name
        xt = x.contiguous() + 0.5
        ka = tk.kl_fwd(x, xt, tok, 0.9, 0, IGNORE)
        kb = tk.kl_fwd(x.contiguous(), xt, tok, 0.9, 0, IGNORE)
        for a, b in zip(ka, kb):
            assert torch.equal(a, b), name
        assert torch.equal(tk.kl_bwd(x, xt, up, *ka[1:3], ka[0], 0.9),
                           tk.kl_bwd(x.contiguous(), xt, up, *ka[1:3], ka[0], 0.9)), name


@pytest.mark.parametrize("split", [2, 5])
def test_split_vocab_path_matches_one_program_per_row(split):
    """The few-rows variant (each row split over programs + a combine kernel) gives the same results."""
    x = make_logits(3, 20000, torch.bfloat16, "peaked", seed=4)
    x[1, 5000:] = float("-inf")  # whole splits of one row carry no mass
    xt = make_logits(3, 20000, torch.bfloat16, "random", seed=5)
    tok = make_tokens(3, 20000, seed=4, ignore_rows=(2,))
    tok[0] = 19999
    one = tlp._fwd(x, tok, 0.7, 0, IGNORE, True, split=1)
    many = tlp._fwd(x, tok, 0.7, 0, IGNORE, True, split=split)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    k_one = tkl._fwd(x, xt, tok, 0.7, 0, IGNORE, split=1)
    k_many = tkl._fwd(x, xt, tok, 0.7, 0, IGNORE, split=split)
    for a, b in zip(k_one, k_many):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    check_2x(k_many[0].cpu(), contract_kl(x.cpu(), xt.cpu(), 0.7), contract_kl(x.cpu(), xt.cpu(), 0.7,
                                                                                torch.float32), "split kl")


# ------------------------------------------------------------------------------------------------------------
# kl_fwd / kl_bwd
# ------------------------------------------------------------------------------------------------------------

KL_CASES = [  # (N, V, student dtype, teacher dtype, temperature, relation)
    (2, 151936, torch.bfloat16, torch.bfloat16, 1.0, "random"),
    (1, 128256, torch.float32, torch.float32, 0.7, "near"),
    (2, 50257, torch.float16, torch.float32, 1.0, "peaked"),
    (3, 32000, torch.float32, torch.float32, 1.5, "near"),
    (5, 1003, torch.bfloat16, torch.bfloat16, 0.7, "peaked"),
    (4, 7, torch.float32, torch.float32, 1.0, "random"),
]


def _kl_pair(n, v, ds, dt_, relation, seed=0):
    xs = make_logits(n, v, torch.float32, "peaked" if relation == "peaked" else "random", seed)
    if relation == "near":  # near-identical student / teacher: KL ~ 1e-6
        xt = xs + 1e-3 * torch.randn(n, v, generator=torch.Generator().manual_seed(seed + 9)).to(DEV)
    else:
        xt = make_logits(n, v, torch.float32, relation, seed + 1)
    return xs.to(ds), xt.to(dt_)


@pytest.mark.parametrize("case", KL_CASES, ids=lambda c: f"N{c[0]}-V{c[1]}-{c[2]}-{c[3]}-T{c[4]}-{c[5]}")
def test_kl_fwd_matches_float64(case):
    n, v, ds, dt_, temp, relation = case
    xs, xt = _kl_pair(n, v, ds, dt_, relation)
    tok = make_tokens(n, v, ignore_rows=(2,) if n > 2 else ())
    inv_t = 1.0 / temp
    kl, lse_s, lse_t, logp = tk.kl_fwd(xs, xt, tok, inv_t, 0, IGNORE)
    xs_c, xt_c = xs.cpu(), xt.cpu()
    check_2x(kl.cpu(), contract_kl(xs_c, xt_c, inv_t), contract_kl(xs_c, xt_c, inv_t, torch.float32), "kl")
    ref = contract_logprob(xs_c, tok.cpu(), inv_t)
    t32 = contract_logprob(xs_c, tok.cpu(), inv_t, dtype=torch.float32)
    check_2x(logp.cpu(), ref[0], t32[0], "logp_s")
    check_2x(lse_s.cpu(), ref[2], t32[2], "lse_s")
    check_2x(lse_t.cpu(), contract_logprob(xt_c, tok.cpu(), inv_t)[2],
             contract_logprob(xt_c, tok.cpu(), inv_t, dtype=torch.float32)[2], "lse_t")
    no_tok = tk.kl_fwd(xs, xt, None, inv_t, 0, IGNORE)
    assert no_tok[3].shape == (0,) and torch.equal(no_tok[0], kl)


def test_kl_identical_rows_is_exactly_zero():
    x = make_logits(3, 50257, torch.bfloat16, "peaked", seed=8)
    kl = tk.kl_fwd(x, x.clone(), None, 0.7, 0, IGNORE)[0]
    assert torch.equal(kl, torch.zeros_like(kl))


# + a confident student against an unrelated confident teacher at T = 0.7: KL ~ 40 and, at the student's top
# column, log p_s - log p_t - KL is a tiny difference of two ~40s (the case that needs a float64 kl).
KL_BWD_CASES = KL_CASES[1::2] + [KL_CASES[0], (3, 32000, torch.float32, torch.float32, 0.7, "peaked")]


@pytest.mark.parametrize("case", KL_BWD_CASES, ids=lambda c: f"N{c[0]}-V{c[1]}-{c[2]}-T{c[4]}-{c[5]}")
def test_kl_bwd_matches_float64(case):
    n, v, ds, dt_, temp, relation = case
    xs, xt = _kl_pair(n, v, ds, dt_, relation, seed=2)
    inv_t = 1.0 / temp
    up = torch.linspace(-2.0, 1.5, n).to(DEV)
    xs_c, xt_c = xs.cpu(), xt.cpu()
    ref = grad_oracle(lambda xd: (contract_kl(xd, xt_c, inv_t, xd.dtype),), xs_c, (up.cpu(),), torch.float64)
    t32 = grad_oracle(lambda xd: (contract_kl(xd, xt_c, inv_t, xd.dtype),), xs_c, (up.cpu(),), torch.float32)
    t32 = t32.to(ds).float()
    # 1) the fwd -> bwd chain: the backward recomputes z = x * inv_t rounded to fp32, exactly as the forward did,
    # so its lse_s / lse_t (float64) are consistent with it and log p of a confident column stays exact
    kl, lse_s, lse_t, _ = tk.kl_fwd(xs, xt, None, inv_t, 0, IGNORE)
    grad = tk.kl_bwd(xs, xt, up, lse_s, lse_t, kl, inv_t)
    assert grad.dtype == ds and grad.shape == xs.shape and grad.is_contiguous()
    check_2x(grad.cpu().float(), ref, t32, "grad_xs (fwd -> bwd)")
    # 2) the kernel alone, given the exact per-row scalars. Only at T = 1, where z = x has no rounding: at other
    # temperatures an lse of the exact z differs from one of the rounded z by ~eps |z|, which a confident
    # column's log p = z - lse would inherit (PyTorch never mixes the two).
    if temp == 1.0:
        exact = [t.to(DEV) for t in (torch.logsumexp(xs_c.double(), -1), torch.logsumexp(xt_c.double(), -1),
                                     contract_kl(xs_c, xt_c, 1.0).float())]
        check_2x(tk.kl_bwd(xs, xt, up, *exact, 1.0).cpu().float(), ref, t32, "grad_xs (exact scalars)")


def test_kl_padded_vocabulary_columns():
    """-inf columns in both rows (a padded vocabulary) add nothing; a -inf teacher column under student mass
    makes the KL infinite, as it should."""
    xs, xt = _kl_pair(3, 1000, torch.float32, torch.float32, "random", seed=6)
    xs[:, 900:] = float("-inf")
    xt[:, 900:] = float("-inf")
    xt[2, 10] = float("-inf")
    xt[1, xs[1].argmax()] = float("-inf")  # at the student's top column too
    kl, lse_s, lse_t, _ = tk.kl_fwd(xs, xt, None, 1.0, 0, IGNORE)
    ref = contract_kl(xs[:1].cpu(), xt[:1].cpu(), 1.0)
    check_2x(kl[:1].cpu(), ref, contract_kl(xs[:1].cpu(), xt[:1].cpu(), 1.0, torch.float32), "padded kl")
    assert kl[1].item() == kl[2].item() == float("inf")
    grad = tk.kl_bwd(xs[:1], xt[:1], torch.ones(1).to(DEV), lse_s[:1], lse_t[:1], kl[:1], 1.0)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[:, 900:]).item() == 0


# ------------------------------------------------------------------------------------------------------------
# NaN, 64-bit offsets, empty and bad input
# ------------------------------------------------------------------------------------------------------------

def check_nan_and_skipped_rows(K):
    """NaN / +inf logits make their row NaN and no other; zero-gradient KL rows and ignored rows are exact zeros and
    never read. K: a module of row kernels (opd_kernels.triton, or torch.ops.opd_C in test_cuda_rows.py)."""
    x = make_logits(3, 5000, torch.bfloat16, "random", seed=1)
    x[1, 4321] = float("nan")
    tok = make_tokens(3, 5000)
    logp, ent, lse = K.logprob_fwd(x, tok, 1.0, 0, IGNORE, True)
    for t in (logp, ent, lse):
        assert torch.isnan(t[1]) and torch.isfinite(t[[0, 2]]).all()
    x_inf = x.clone()
    x_inf[1, 4321] = float("inf")  # +inf is NaN too (the row has no finite softmax)
    assert torch.isnan(torch.stack(K.logprob_fwd(x_inf, tok, 1.0, 0, IGNORE, True)[:2])[:, 1]).all()
    assert torch.isnan(K.kl_fwd(x_inf, x, None, 1.0, 0, IGNORE)[0][1])
    grad = K.logprob_bwd(x, tok, torch.ones(3).to(DEV), None, lse, ent, 1.0, 0, IGNORE)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
    kl, lse_s, lse_t, _ = K.kl_fwd(x, x.roll(1, 0), None, 1.0, 0, IGNORE)
    assert torch.isnan(kl[[1, 2]]).all() and torch.isfinite(kl[0])  # row 2's teacher is row 1
    g = torch.tensor([1.0, 0.0, 1.0]).to(DEV)  # a zero upstream gradient (masked row): exact zeros, NaN or not
    grad = K.kl_bwd(x, x.roll(1, 0), g, lse_s, lse_t, kl, 1.0)
    assert torch.count_nonzero(grad[1]).item() == 0 and torch.isnan(grad[2]).all()
    # an ignored row is not read at all: a NaN there leaks nowhere
    tok[1] = IGNORE
    logp, ent, lse = K.logprob_fwd(x, tok, 1.0, 0, IGNORE, True)
    assert torch.isfinite(torch.stack([logp, ent, lse.float()])).all() and logp[1].item() == ent[1].item() == 0.0
    grad = K.logprob_bwd(x, tok, torch.ones(3).to(DEV), torch.ones(3).to(DEV), lse, ent, 1.0, 0, IGNORE)
    assert torch.count_nonzero(grad[1]).item() == 0 and torch.isfinite(grad).all()


def check_64_bit_row_offsets(K):
    """Rows 2^30 + 16 elements apart: row 2 starts past 2^31 elements (int32 offsets would read out of bounds).
    The 4 GiB buffer is allocated but never touched outside the three rows (lazily mapped on CPU)."""
    v, stride = 4099, (1 << 30) + 16
    buf = torch.empty(2 * stride + v, dtype=torch.bfloat16, device=DEV)
    x = buf.as_strided((3, v), (stride, 1))
    x.copy_(make_logits(3, v, torch.bfloat16, "peaked", seed=12))
    dense = x.contiguous()
    tok = make_tokens(3, v, seed=12)
    got = K.logprob_fwd(x, tok, 1.0, 0, IGNORE, True)
    for a, b in zip(got, K.logprob_fwd(dense, tok, 1.0, 0, IGNORE, True)):
        assert torch.equal(a, b)
    up = torch.ones(3).to(DEV)
    assert torch.equal(K.logprob_bwd(x, tok, up, up, got[2], got[1], 1.0, 0, IGNORE),
                       K.logprob_bwd(dense, tok, up, up, got[2], got[1], 1.0, 0, IGNORE))
    k = K.kl_fwd(x, dense.flip(0), tok, 1.0, 0, IGNORE)
    for a, b in zip(k, K.kl_fwd(dense, dense.flip(0), tok, 1.0, 0, IGNORE)):
        assert torch.equal(a, b)
    assert torch.equal(K.kl_bwd(x, dense.flip(0), up, k[1], k[2], k[0], 1.0),
                       K.kl_bwd(dense, dense.flip(0), up, k[1], k[2], k[0], 1.0))


def test_nan_logits_propagate_to_their_row_only():
    check_nan_and_skipped_rows(tk)


def test_row_offsets_are_64_bit():
    check_64_bit_row_offsets(tk)


def test_empty_rows():
    x = torch.empty(0, 32000, dtype=torch.bfloat16, device=DEV)
    tok = torch.empty(0, dtype=torch.int64, device=DEV)
    logp, ent, lse = tk.logprob_fwd(x, tok, 1.0, 0, IGNORE, True)
    assert logp.shape == ent.shape == lse.shape == (0,)
    assert tk.logprob_bwd(x, tok, logp, None, lse, ent, 1.0, 0, IGNORE).shape == (0, 32000)
    kl = tk.kl_fwd(x, x, tok, 1.0, 0, IGNORE)
    assert all(t.shape == (0,) for t in kl)
    assert tk.kl_bwd(x, x, kl[0], kl[1], kl[2], kl[0], 1.0).shape == (0, 32000)


def test_bad_input_raises_clear_errors(monkeypatch):
    x = make_logits(2, 10, torch.float32)
    tok = make_tokens(2, 10)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tk.logprob_fwd(x.double(), tok, 1.0, 0, IGNORE, False)
    with pytest.raises(TypeError, match="int64"):
        tk.logprob_fwd(x, tok.int(), 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="one value per row"):
        tk.logprob_fwd(x, tok[:1], 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="2-D"):
        tk.logprob_fwd(x[None], tok, 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="unit stride"):
        tk.logprob_fwd(torch.randn(10, 2, device=DEV).t(), tok, 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="empty vocabulary"):
        tk.logprob_fwd(x[:, :0], tok, 1.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="inv_temperature"):
        tk.logprob_fwd(x, tok, 0.0, 0, IGNORE, False)
    with pytest.raises(ValueError, match="same shape"):
        tk.kl_fwd(x, x[:, :9], None, 1.0, 0, IGNORE)
    if DEV == "cpu":
        monkeypatch.setattr(_common, "_INTERPRETED", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            tk.logprob_fwd(x, tok, 1.0, 0, IGNORE, False)


# ------------------------------------------------------------------------------------------------------------
# fused OPD epilogues
# ------------------------------------------------------------------------------------------------------------

def _sampled_kl(d, kind):
    return d if kind == 1 else 0.5 * d * d if kind == 2 else torch.expm1(-d) + d


def _epilogue_inputs(n, v, dtype, seed):
    x = make_logits(n, v, dtype, "peaked", seed)
    tok = make_tokens(n, v, seed)
    tok[1], tok[2] = -1, v  # out-of-vocabulary ids: logp = 0, never read
    g = torch.Generator().manual_seed(seed + 5)
    adv = torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    x[3] = float("nan")  # a masked row is not read: its NaN leaks nowhere
    return x, tok, adv.to(DEV), mask.to(DEV)


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_opd_sampled_fwd_matches_float64(kind):
    n, v, coef, inv_t = 6, 50257, 0.7, 1 / 0.8
    x, tok, adv, mask = _epilogue_inputs(n, v, torch.bfloat16, seed=21)
    keep = mask.cpu()
    lp64 = torch.where(keep, contract_logprob(x.cpu(), tok.cpu(), inv_t)[0], 0.0)
    lp32 = torch.where(keep, contract_logprob(x.cpu(), tok.cpu(), inv_t, dtype=torch.float32)[0], 0.0)
    # teacher log-probs 1e-5 away from the student's: k3 ~ 5e-11 must not drown in cancellation
    tlp = (lp64 - 1e-5 * torch.arange(1, n + 1)).float()
    adv_out, kl, logp = tk.opd_sampled_fwd(x, tok, adv, tlp.to(DEV), mask, coef, inv_t, kind)
    check_2x(logp.cpu(), lp64, lp32, "logp")
    # The epilogue itself is exact up to the final fp32 rounding: k and A - coef * k from the kernel's own logp
    # (fp64 math; k3 of d ~ 1e-5 keeps full relative precision, where fp32 expm1(-d) + d would lose ~1e-2).
    k_own = torch.where(keep, _sampled_kl(logp.cpu().double() - tlp.double(), kind), 0.0)
    torch.testing.assert_close(kl.cpu().double(), k_own, rtol=2 * EPS32, atol=1e-30)
    torch.testing.assert_close(adv_out.cpu().double(), adv.cpu().double() - coef * k_own, rtol=2 * EPS32, atol=1e-30)
    assert logp[1].item() == logp[2].item() == 0.0
    assert kl[3].item() == 0.0 and adv_out[3].item() == adv[3].item()  # masked: advantage kept
    no_mask = tk.opd_sampled_fwd(x[keep.to(DEV)], tok[keep.to(DEV)], adv[keep.to(DEV)], tlp[keep].to(DEV), None,
                                 coef, inv_t, kind)
    assert torch.equal(no_mask[1], kl[keep.to(DEV)])


def test_opd_full_fwd_matches_float64():
    n, v, coef, inv_t = 6, 32000, 1.5, 1.0
    x, tok, adv, mask = _epilogue_inputs(n, v, torch.float32, seed=22)
    xt = (x + 0.05 * torch.randn(n, v, generator=torch.Generator().manual_seed(1)).to(DEV)).to(torch.bfloat16)
    keep = mask.cpu()
    adv_out, kl, logp = tk.opd_full_fwd(x, xt, tok, adv, mask, coef, inv_t)
    xs_c, xt_c = x.cpu()[keep], xt.cpu()[keep]
    k64, k32 = contract_kl(xs_c, xt_c, inv_t), contract_kl(xs_c, xt_c, inv_t, torch.float32)
    check_2x(kl.cpu()[keep], k64, k32, "kl")
    check_2x(logp.cpu()[keep], contract_logprob(xs_c, tok.cpu()[keep], inv_t)[0],
             contract_logprob(xs_c, tok.cpu()[keep], inv_t, dtype=torch.float32)[0], "logp")
    check_2x(adv_out.cpu()[keep], adv.cpu()[keep].double() - coef * k64, adv.cpu()[keep] - coef * k32, "adv")
    assert kl[3].item() == logp[3].item() == 0.0 and adv_out[3].item() == adv[3].item()
    assert torch.equal(tk.kl_fwd(x[keep.to(DEV)], xt[keep.to(DEV)], None, inv_t, 0, IGNORE)[0].float(),
                       kl[keep.to(DEV)])


def test_opd_epilogue_bad_input():
    x, tok, adv, mask = _epilogue_inputs(4, 10, torch.float32, seed=1)
    with pytest.raises(ValueError, match="kl_kind"):
        tk.opd_sampled_fwd(x, tok, adv, adv, None, 1.0, 1.0, 4)
    with pytest.raises(TypeError, match="bool"):
        tk.opd_sampled_fwd(x, tok, adv, adv, mask.float(), 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="advantages"):
        tk.opd_full_fwd(x, x, tok, adv[:2], None, 1.0, 1.0)
