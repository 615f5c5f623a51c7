"""token_logprobs (+ entropy, + gradients) against the float64 oracle, on every backend of this machine."""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels.ops.token_logprobs import token_logprobs_reference as reference
from ops_util import (DTYPES, VOCABS, assert_within_rule, grad_of, identity, logits, max_err, rows_for,
                      tokens_for)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings in Triton's interpreter


def _forward_vs_oracle(backend, base, tokens, temperature, what, view=identity):
    logp, entropy = ok.token_logprobs(view(base), tokens, temperature=temperature, return_entropy=True)
    oracle = reference(view(base.double()), tokens, temperature=temperature, return_entropy=True)
    torch32 = reference(view(base.float()), tokens, temperature=temperature, return_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == tokens.shape
    assert_within_rule(logp, oracle[0], torch32[0], f"{what} logp", backend)
    assert_within_rule(entropy, oracle[1], torch32[1], f"{what} entropy", backend)


def _gradient_vs_oracle(backend, base, tokens, temperature, gen, what, view=identity):
    """Gradient w.r.t. base (through the view, so the layout reaches the op) of a non-uniform combination of
    logp and entropy."""
    run = lambda v: ok.token_logprobs(v, tokens, temperature=temperature, return_entropy=True)  # noqa: E731
    ref = lambda v: reference(v, tokens, temperature=temperature, return_entropy=True)  # noqa: E731
    ups = tuple(torch.randn(tokens.shape, generator=gen).to(base.device) for _ in range(2))
    grad = grad_of(run, base, ups, view=view)
    assert grad.dtype == base.dtype and grad.shape == base.shape
    assert_within_rule(grad, grad_of(ref, base.double(), ups, view=view),
                       grad_of(ref, base, ups, torch.float32, view=view), f"{what} grad", backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
def test_matches_float64_oracle(backend, vocab, dtype, gen):
    if backend.slow and vocab in (128256, 50257) and dtype != torch.float32:
        pytest.skip("Triton interpreter: 151936 and 32000 cover large vocabularies in every dtype")
    n = rows_for(vocab, backend.slow)
    cases = []
    for kind, temperature in (("random", 1.0), ("peaked", 0.7), ("wide", 1.6)):
        x = logits((n, vocab), dtype, gen, kind, backend.device)
        cases.append((x, tokens_for(x, gen), temperature, f"{kind} T={temperature}"))
        _forward_vs_oracle(backend, *cases[-1])
    backend.require_float64_lse()
    for x, tokens, temperature, what in cases:
        _gradient_vs_oracle(backend, x, tokens, temperature, gen, what)


VIEWS = {  # non-contiguous layouts of a [B, S, V] tensor
    "lm-shift logits[:, :-1]": lambda t: t[:, :-1],
    "seq-first transpose": lambda t: t.transpose(0, 1),
    "vocabulary stride 2": lambda t: t[..., ::2],
    "broadcast row": lambda t: t[:1, :1].expand(t.shape[0], 3, t.shape[2]),
    "one row, no batch dims": lambda t: t[0, 0],
    "middle slice": lambda t: t[:, 1:-1:2],
}


@pytest.mark.parametrize("layout", VIEWS)
def test_non_contiguous_inputs(backend, layout, gen):
    base = logits((3, 7, 1031), torch.bfloat16, gen, "random", backend.device)
    view = VIEWS[layout]
    tokens = tokens_for(view(base), gen)
    _forward_vs_oracle(backend, base, tokens, 0.9, layout, view)
    backend.require_float64_lse()
    _gradient_vs_oracle(backend, base, tokens, 0.9, gen, layout, view)


def test_ignore_index_rows_give_zero_and_zero_gradient(backend, gen):
    x = logits((6, 257), torch.float32, gen, "random", backend.device)
    tokens = tokens_for(x, gen)
    tokens[[1, 4]] = -7
    x[4] = float("nan")  # an ignored row is never read into the result
    logp, entropy = ok.token_logprobs(x, tokens, ignore_index=-7, return_entropy=True)
    assert torch.all(logp[[1, 4]] == 0) and torch.all(entropy[[1, 4]] == 0)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    grad = grad_of(lambda v: ok.token_logprobs(v, tokens, ignore_index=-7, return_entropy=True), x,
                   (torch.ones(6, device=x.device), torch.ones(6, device=x.device)))
    assert torch.all(grad[[1, 4]] == 0) and torch.isfinite(grad).all()
    every = torch.full_like(tokens, -100)
    assert torch.all(ok.token_logprobs(x, every) == 0)


def test_empty_inputs(backend):
    for shape in ((0, 50), (2, 0, 50)):
        x = torch.zeros(shape, device=backend.device, requires_grad=True)
        tokens = torch.zeros(shape[:-1], dtype=torch.long, device=backend.device)
        logp, entropy = ok.token_logprobs(x, tokens, return_entropy=True)
        assert logp.shape == entropy.shape == shape[:-1]
        (logp.sum() + entropy.sum()).backward()
        assert x.grad.shape == shape


def test_nan_and_inf_logits_propagate_as_nan(backend, gen):
    x = logits((4, 300), torch.float32, gen, "random", backend.device)
    x[0, 5] = float("nan")
    x[1, 17] = float("inf")
    x[2, :100] = float("-inf")  # a masked-out part of the vocabulary: p = 0 there, the row stays finite
    tokens = torch.tensor([3, 4, 150, 6], device=x.device)
    logp, entropy = ok.token_logprobs(x, tokens, return_entropy=True)
    assert torch.isnan(logp[:2]).all() and torch.isnan(entropy[:2]).all()
    ref = reference(x[2:].double(), tokens[2:], return_entropy=True)
    assert max_err(logp[2:], ref[0]) < 1e-5 and max_err(entropy[2:], ref[1]) < 1e-5
    tokens[2] = 50  # a token on a -inf column has log-probability -inf
    assert ok.token_logprobs(x, tokens)[2] == float("-inf")


def test_row_offsets_beyond_int32(backend, gen):
    """Row 1 starts 2^31 + 4096 elements into the storage: a kernel computing row * stride in int32 reads the
    wrong memory. The storage is allocated lazily by the OS; only the two rows are ever touched."""
    if backend.device != "cpu":
        pytest.skip("needs a 4 GiB lazily committed host allocation")
    if backend.slow:
        pytest.skip("Triton's interpreter copies whole storages to host arrays (4 GiB); the GPU run covers it")
    vocab, stride = 151936, 2**31 + 4096
    storage = torch.empty(stride + vocab, dtype=torch.bfloat16)
    rows = logits((2, vocab), torch.bfloat16, gen, "peaked")
    storage[:vocab], storage[stride:] = rows[0], rows[1]
    x = storage.as_strided((2, vocab), (stride, 1))
    tokens = tokens_for(rows, gen)
    logp, entropy = ok.token_logprobs(x, tokens, return_entropy=True)
    expected = ok.token_logprobs(rows, tokens, return_entropy=True)
    torch.testing.assert_close(logp, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(entropy, expected[1], rtol=0, atol=0)
    kl = ok.reverse_kl(x, x.flip(0))
    torch.testing.assert_close(kl, ok.reverse_kl(rows, rows.flip(0)), rtol=0, atol=0)


def test_result_is_a_drop_in_for_log_softmax_gather(backend, gen):
    """The typical call: tokens shifted against the logits, no copy, matches log_softmax(...).gather(...)."""
    x = logits((2, 9, 513), torch.float32, gen, "random", backend.device)
    ids = torch.randint(0, 513, (2, 9), generator=gen).to(x.device)
    logp = ok.token_logprobs(x[:, :-1], ids[:, 1:])
    expected = torch.log_softmax(x[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert max_err(logp, expected) < 5e-6
