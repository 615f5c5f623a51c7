"""The torch.library custom ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch) on every
backend, and torch.compile(fullgraph=True) over each public op (forward and backward) without graph breaks."""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels.ops import opd_advantages as oa, reverse_kl as rk, token_logprobs as tl, topk_kl as tk

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings in Triton's interpreter


def _cases(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 37, generator=gen).to(device)
    xt = torch.randn(3, 4, 37, generator=gen).to(device)
    tokens = torch.randint(0, 37, (3, 4), generator=gen).to(device)
    tokens[0, 1] = -100
    vec = lambda: torch.randn(3, 4, generator=gen).to(device)  # noqa: E731
    mask = (torch.rand(3, 4, generator=gen) > 0.4).to(device)
    safe = tokens.clamp(min=0)
    seq_first = torch.randn(4, 3, 37, generator=gen).to(device).transpose(0, 1)  # dense, non-contiguous
    lse = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device)
    lq, ids = torch.log_softmax(xt.double(), -1).topk(5, -1)
    lq = lq.float()
    return {
        "token_logprobs_fwd": (tl.token_logprobs_fwd, [
            (x.requires_grad_(), tokens, 0.7, 0, 37, -100, True),
            (seq_first.requires_grad_(), tokens, 1.0, 0, 37, -100, False),
            (x.detach().bfloat16(), tokens, 1.3, 10, 74, -100, True)]),  # a shard starting at vocab id 10
        "token_logprobs_bwd": (tl.token_logprobs_bwd, [
            (x.detach(), tokens, vec(), vec(), lse, vec(), 0.7, 0, -100),
            (seq_first.detach(), tokens, vec(), None, lse, torch.empty(0, device=device), 1.0, 0, -100)]),
        "kl_fwd": (rk.kl_fwd, [
            (x.detach().requires_grad_(), xt, None, 0.9, 0, 37, -100),
            (x.detach(), xt, tokens, 1.0, 0, 37, -100)]),
        "kl_bwd": (rk.kl_bwd, [(x.detach(), xt, vec(), lse, lse + 0.1, lse.abs(), 0.9)]),
        "opd_sampled_fwd": (oa.opd_sampled_fwd, [
            (x.detach(), safe, vec(), vec(), mask, 0.5, 1.0, kind) for kind in (1, 2, 3)]),
        "opd_full_fwd": (oa.opd_full_fwd, [(x.detach(), xt, safe, vec(), None, 0.5, 0.8),
                                           (x.detach(), xt, safe, vec(), mask, 2.0, 1.0)]),
        "topk_kl_fwd": (tk.topk_kl_fwd, [(x.detach().requires_grad_(), ids, lq, mask, 0.9),
                                         (seq_first.detach(), ids, lq, None, 1.0)]),
        "topk_kl_bwd": (tk.topk_kl_bwd, [(x.detach(), ids, lq, mask, vec(), lse, lse.abs(), lse * 0.1, 0.9)]),
        "opd_topk_fwd": (oa.opd_topk_fwd, [(x.detach(), safe, vec(), ids, lq, mask, 0.5, 0.8)]),
    }


@pytest.mark.parametrize("op_name", list(_cases("cpu")))
def test_opcheck(backend, op_name):
    op, calls = _cases(backend.device)[op_name]
    for args in calls:
        torch.library.opcheck(op, args)


def _public_calls(x, xt, tokens, adv, teacher_lp, mask, ids, lq):
    logp, entropy = ok.token_logprobs(x[:, :-1], tokens[:, 1:], temperature=0.8, return_entropy=True)
    kl = ok.reverse_kl(x, xt, temperature=0.8, mask=mask)
    topk = ok.topk_kl(x, ids, lq, temperature=0.8, mask=mask)
    sampled = ok.opd_advantages(x.detach(), tokens, adv, teacher_logprobs=teacher_lp, kl="k3", mask=mask)
    full = ok.opd_advantages(x.detach(), tokens, adv, teacher_logits=xt, kl="full", coef=0.5)
    top = ok.opd_advantages(x.detach(), tokens, adv, teacher_topk_ids=ids, teacher_topk_logprobs=lq, kl="topk")
    return logp, entropy, kl, topk, *sampled, *full, *top


def test_compile_fullgraph_matches_eager():
    """One compiled graph calls every public op (the LM-shift view included) and differentiates two of them;
    fullgraph=True fails on any graph break."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 50, generator=gen)
    xt = torch.randn(2, 6, 50, generator=gen)
    tokens = torch.randint(0, 50, (2, 6), generator=gen)
    adv, teacher_lp = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    mask = torch.rand(2, 6, generator=gen) > 0.3
    lq, ids = torch.log_softmax(xt, -1).topk(7, -1)
    compiled = torch.compile(_public_calls, fullgraph=True)
    results = {}
    for name, fn in (("eager", _public_calls), ("compiled", compiled)):
        leaf = x.clone().requires_grad_()
        outs = fn(leaf, xt, tokens, adv, teacher_lp, mask, ids, lq)
        (outs[0].sum() + 0.5 * outs[1].sum() + 2 * outs[2].sum() - outs[3].sum()).backward()
        results[name] = (*outs, leaf.grad)
    for got, expected in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
