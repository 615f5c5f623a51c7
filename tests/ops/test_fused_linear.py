"""fused_linear_logprobs (output layer + log-prob / entropy / KL, chunked over tokens) against the float64 oracle of
the materialised path, on every CPU backend; its memory bound; tensor parallelism over 2 gloo ranks.

Tolerance: the ops' rule (ops_util.py), where "PyTorch's own path" is the materialised one in the inputs' dtype
(``fused_linear_reference``: ``h @ W.T`` in that dtype, log_softmax in fp32): a bf16 run's logits are bf16 in both,
so the bf16 rounding of the logits is the error both paths share.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import opd_kernels as ok
from opd_kernels import _backend, use_backend
from opd_kernels.ops.fused_linear import default_chunk_rows, fused_linear_reference
from ops_util import assert_within_rule

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
T, D, D_T, V, K = 37, 24, 40, 1031, 12     # odd V, a teacher of another hidden size


def _inputs(gen, vocab=V, tokens_rows=T):
    h = torch.randn(tokens_rows, D, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, D, generator=gen, dtype=torch.float64) * 0.5
    w[3] *= 8                                                            # a few confident rows (token 3)
    th = torch.randn(tokens_rows, D_T, generator=gen, dtype=torch.float64)
    tw = torch.randn(vocab + 9, D_T, generator=gen, dtype=torch.float64) * 0.5   # padded teacher head
    tokens = torch.randint(0, vocab, (tokens_rows,), generator=gen)
    tokens[::4] = 3
    tokens[[5, 17]] = -100                                              # ignored rows
    ids = torch.randn(tokens_rows, vocab, generator=gen).topk(K, -1).indices
    lq = torch.log_softmax(torch.randn(tokens_rows, K, generator=gen, dtype=torch.float64), -1) - 0.7
    ups = torch.randn(3, tokens_rows, generator=gen, dtype=torch.float64)
    return h, w, th, tw, tokens, (ids, lq.float()), ups


def _teacher(kind, th, tw, topk, dtype):
    if kind == "linear":
        return ok.LinearTeacher(th.to(dtype), tw.to(dtype))
    return ok.TopKTeacher(*topk) if kind == "topk" else None


def _run(fn, h, w, tokens, teacher, ups, dtype, temperature, **kw):
    """Outputs and (grad_h, grad_w) of sum_i ups_i . out_i."""
    hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = fn(hh, ww, tokens, temperature=temperature, return_entropy=True, teacher=teacher, **kw)
    vals = [out.logp, out.entropy] + ([out.kl] if out.kl is not None else [])
    total = sum((v * u.to(v.dtype)).sum() for v, u in zip(vals, ups))
    grads = torch.autograd.grad(total, (hh, ww))
    return [v.detach() for v in vals], grads


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("teacher", (None, "linear", "topk"))
@pytest.mark.parametrize("temperature,chunk", ((1.0, 10), (0.7, 64), (1.3, 1)))
def test_matches_the_materialised_path(backend, teacher, dtype, temperature, chunk, gen):
    if backend.slow and (chunk == 1 or dtype != torch.float32):
        pytest.skip("Triton interpreter: fp32 with chunks of 10 and 64 rows cover it")
    h, w, th, tw, tokens, topk, ups = _inputs(gen)
    ref = lambda dt: _run(fused_linear_reference, h, w, tokens, _teacher(teacher, th, tw, topk, dt), ups,  # noqa
                          dt, temperature)
    oracle, torch_path = ref(torch.float64), ref(dtype)
    got = _run(ok.fused_linear_logprobs, h, w, tokens, _teacher(teacher, th, tw, topk, dtype), ups, dtype,
               temperature, chunk_size=chunk)
    for name, g, o, t in zip(("logp", "entropy", "kl"), got[0], oracle[0], torch_path[0]):
        assert g.dtype == torch.float32 and g.shape == tokens.shape
        assert_within_rule(g, o, t, f"{name} ({teacher}, {dtype}, T={temperature}, chunk {chunk})", backend)
    for name, g, o, t in zip(("grad_hidden", "grad_weight"), got[1], oracle[1], torch_path[1]):
        assert g.dtype == dtype
        assert_within_rule(g, o, t, f"{name} ({teacher}, {dtype}, T={temperature}, chunk {chunk})", backend)


def test_ignored_rows_and_unused_outputs(gen):
    """Ignored rows give 0 and no gradient; an output without upstream gradient (detached entropy) is skipped."""
    h, w, _, _, tokens, _, ups = _inputs(gen)
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    out = ok.fused_linear_logprobs(hh, ww, tokens, return_entropy=True, chunk_size=8)
    assert torch.all(out.logp[[5, 17]] == 0) and torch.all(out.entropy[[5, 17]] == 0) and out.kl is None
    (gh,) = torch.autograd.grad((out.logp * ups[0].float()).sum(), hh)
    assert torch.all(gh[[5, 17]] == 0)
    h = h.requires_grad_()
    (gref,) = torch.autograd.grad((fused_linear_reference(h, w, tokens).logp * ups[0]).sum(), h)
    torch.testing.assert_close(gh.double(), gref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("teacher", (None, "linear", "topk"))
def test_ignored_rows_skip_the_output_layer(teacher, gen):
    """Ignored (prompt) rows never reach the output layer: NaN hidden states there change no output and no gradient
    (a row that went through ``h @ W.T`` would spread NaN into grad_weight); all rows ignored gives zeros."""
    h, w, th, tw, tokens, topk, ups = _inputs(gen)
    h, w, th, tw = h.float(), w.float(), th.float(), tw.float()
    ignored = tokens == -100
    poisoned, t_poisoned = h.clone(), th.clone()
    poisoned[ignored], t_poisoned[ignored] = float("nan"), float("nan")
    clean = _run(ok.fused_linear_logprobs, h, w, tokens, _teacher(teacher, th, tw, topk, torch.float32), ups,
                 torch.float32, 1.0, chunk_size=8)
    got = _run(ok.fused_linear_logprobs, poisoned, w, tokens, _teacher(teacher, t_poisoned, tw, topk, torch.float32),
               ups, torch.float32, 1.0, chunk_size=8)
    for a, b in zip(got[0], clean[0]):
        torch.testing.assert_close(a, b)
    assert torch.all(got[1][0][ignored] == 0)
    torch.testing.assert_close(got[1][0][~ignored], clean[1][0][~ignored])
    torch.testing.assert_close(got[1][1], clean[1][1])
    kl = {"linear": "full", "topk": "topk"}.get(teacher, "k1")
    src = _teacher(teacher, t_poisoned, tw, topk, torch.float32)
    adv = ok.fused_linear_opd_advantages(poisoned, w, tokens, ups[0].float(), kl=kl, mask=~ignored, teacher=src,
                                         teacher_logprobs=None if src else ups[1].float(), chunk_size=8)
    assert all(bool(torch.isfinite(t).all()) for t in adv if t is not None)
    assert torch.equal(adv.advantages[ignored], ups[0].float()[ignored]) and torch.all(adv.kl[ignored] == 0)
    none = ok.fused_linear_logprobs(poisoned, w, torch.full_like(tokens, -100), return_entropy=True)
    assert all(torch.equal(t, torch.zeros(T)) for t in (none.logp, none.entropy))
    all_masked = ok.fused_linear_opd_advantages(poisoned, w, tokens, ups[0].float(), kl="k1",
                                                teacher_logprobs=ups[1].float(), mask=torch.zeros(T, dtype=torch.bool))
    assert torch.equal(all_masked.advantages, ups[0].float()) and torch.equal(all_masked.kl, torch.zeros(T))


def test_batch_dims_and_megatron_layout(gen):
    """[S, 1, d] hidden states (Megatron's layout) with [S, 1] tokens give the flat results, reshaped."""
    h, w, _, _, tokens, _, _ = _inputs(gen)
    flat = ok.fused_linear_logprobs(h.float(), w.float(), tokens).logp
    seq = ok.fused_linear_logprobs(h.float()[:, None], w.float(), tokens[:, None]).logp
    assert seq.shape == (T, 1)
    torch.testing.assert_close(seq[:, 0], flat)


def test_clear_errors(gen):
    h, w, th, tw, tokens, _, _ = _inputs(gen)
    h, w = h.float(), w.float()
    with pytest.raises(ValueError, match="do not match"):
        ok.fused_linear_logprobs(h, w[:, :5], tokens)
    with pytest.raises(ValueError, match="positions"):
        ok.fused_linear_logprobs(h, w, tokens[:5])
    with pytest.raises(ValueError, match="vocabulary"):
        ok.fused_linear_logprobs(h, w, tokens, teacher=ok.LinearTeacher(th.float(), tw.float()[:100]))
    with pytest.raises(ValueError, match="chunk_size"):
        ok.fused_linear_logprobs(h, w, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ok.fused_linear_opd_advantages(h, w, tokens, torch.zeros(T), teacher_logprobs=torch.zeros(T), chunk_size=-3)
    with pytest.raises(ValueError, match="takes"):
        ok.fused_linear_opd_advantages(h, w, tokens, torch.zeros(T), kl="full", teacher_logprobs=torch.zeros(T))
    with pytest.raises(TypeError, match="teacher"):
        ok.fused_linear_logprobs(h, w, tokens, teacher=(th, tw))


class _Sizes(TorchDispatchMode):
    """Records the element count of every NEW tensor an op returns (views of its inputs are not allocations; the
    custom row ops' outputs are counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen and t.numel() > self.largest:
                self.largest, self.where = t.numel(), str(func)
        return out


@pytest.mark.parametrize("teacher", (None, "linear", "topk"))
def test_never_allocates_more_than_one_chunk_of_logits(teacher, gen):
    rows, chunk, vocab = 300, 32, 4099
    h, w, th, tw, tokens, topk, ups = _inputs(gen, vocab=vocab, tokens_rows=rows)
    bound = chunk * vocab                      # > the inputs, grad_h [T, d] and grad_w [V, d]: D < chunk
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    teacher = _teacher(teacher, th.float(), tw.float(), topk, torch.float32)
    with _Sizes() as sizes:
        out = ok.fused_linear_logprobs(hh, ww, tokens, return_entropy=True, chunk_size=chunk, teacher=teacher)
        total = (out.logp * ups[0]).sum() + (out.entropy * ups[1]).sum() + (0 if out.kl is None else out.kl.sum())
        total.backward()
    assert sizes.largest <= bound, f"{sizes.where} returned {sizes.largest} elements > one chunk ({bound})"
    with _Sizes() as materialised:       # the probe sees the [T, V] logits of the materialised path
        fused_linear_reference(hh, ww, tokens).logp.sum().backward()
    assert materialised.largest >= rows * vocab


def test_default_chunk_budget():
    assert default_chunk_rows(49152) == 341 and default_chunk_rows(151936) == 110 and default_chunk_rows(1 << 30) == 1


@pytest.mark.parametrize("kl", ("k1", "k3", "full", "topk"))
def test_opd_advantages_per_chunk_equal_the_materialised_op(kl, gen):
    h, w, th, tw, tokens, topk, ups = _inputs(gen)
    h, w, th, tw = h.float(), w.float(), th.float(), tw.float()
    mask = tokens != -100
    t_lp = ok.token_logprobs(th @ tw[:V].T, torch.where(mask, tokens, 0))
    teacher = {"full": ok.LinearTeacher(th, tw), "topk": ok.TopKTeacher(*topk)}.get(kl)
    source = ({"teacher_logits": th @ tw.T} if kl == "full" else
              {"teacher_topk_ids": topk[0], "teacher_topk_logprobs": topk[1]} if kl == "topk" else
              {"teacher_logprobs": t_lp})
    want = ok.opd_advantages(h @ w.T, tokens, ups[0].float(), kl=kl, coef=0.3, mask=mask, **source)
    got = ok.fused_linear_opd_advantages(h, w, tokens, ups[0].float(), kl=kl, coef=0.3, mask=mask, chunk_size=7,
                                         teacher=teacher, teacher_logprobs=None if teacher else t_lp)
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=lambda m: f"{kl} {name}: {m}")
    # the teacher's token log-probs: given back (k1/k3), from the KL's own teacher chunks (full), none (topk)
    if kl == "full":       # 0 at the rows of token -100
        torch.testing.assert_close(got.teacher_logprobs, torch.where(mask, t_lp, 0.0), atol=2e-6, rtol=2e-5)
    else:
        assert got.teacher_logprobs is (None if kl == "topk" else t_lp)


# ----------------------------------------------------------------------------------------------------------
# Tensor parallelism: 2 gloo ranks, each with half the vocabulary (weight rows)
# ----------------------------------------------------------------------------------------------------------
WORLD, V_R = 2, 517


def _tp_worker(rank: int, init_file: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        h, w, th, tw, tokens, topk, ups = _inputs(torch.Generator().manual_seed(7), vocab=WORLD * V_R)
        tw = tw[:WORLD * V_R]
        shard = slice(rank * V_R, (rank + 1) * V_R)
        for name in backends:
            with use_backend(name):
                for kind in (None, "linear", "topk"):
                    full = _teacher(kind, th.float(), tw.float(), topk, torch.float32)
                    sharded = full if kind != "linear" else ok.LinearTeacher(full.hidden, full.weight[shard])
                    want = _run(ok.fused_linear_logprobs, h.float(), w.float(), tokens, full, ups, torch.float32,
                                0.9, chunk_size=9)
                    got = _run(ok.fused_linear_logprobs, h.float(), w.float()[shard].contiguous(), tokens, sharded,
                               ups, torch.float32, 0.9, chunk_size=9, process_group=dist.group.WORLD)
                    for a, b in zip(got[0], want[0]):
                        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)
                    torch.testing.assert_close(got[1][0], want[1][0], atol=2e-5, rtol=2e-5)   # grad_h: all-reduced
                    torch.testing.assert_close(got[1][1], want[1][1][shard], atol=2e-5, rtol=2e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_equals_unsharded(tmp_path):
    backends = [b for b in ("torch", "cpp") if _backend.available(b, "cpu")]
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    mp.spawn(_tp_worker, args=(str(tmp_path / "rendezvous"), backends), nprocs=WORLD, join=True)
