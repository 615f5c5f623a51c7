"""topk_kl (+ gradient) against the float64 oracle on every backend; K = V is the exact KL; a lower bound below."""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels.ops.reverse_kl import reverse_kl_reference
from opd_kernels.ops.topk_kl import topk_kl_reference as reference
from ops_util import assert_within_rule, grad_of, logits, max_err, near_teacher

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings in Triton's interpreter


def _teacher_topk(student, gen, K, noise=1.0):
    """A teacher near the student, its top-K ids and fp32 log-probs (what an SGLang teacher sends)."""
    teacher = (student.double().cpu() + noise * torch.randn(student.shape, generator=gen, dtype=torch.float64))
    lq = torch.log_softmax(teacher, -1)
    vals, ids = lq.topk(K, -1)
    return teacher, ids.to(student.device), vals.float().to(student.device)


def _check(backend, student, ids, lq, gen, what, temperature=1.0, mask=None, view=lambda t: t):
    args = dict(temperature=temperature, mask=None if mask is None else view(mask))
    kl = ok.topk_kl(view(student), view(ids), view(lq), **args)
    assert kl.dtype == torch.float32 and kl.shape == view(student).shape[:-1]
    oracle = reference(view(student.double()), view(ids), view(lq.double()), **args)
    torch32 = reference(view(student.float()), view(ids), view(lq.float()), **args)
    assert_within_rule(kl, oracle, torch32, f"{what} kl", backend)
    ups = (torch.randn(view(student).shape[:-1], generator=gen).to(student.device),)
    fn = (lambda lq_: lambda s: ok.topk_kl(s, view(ids), view(lq_), **args))
    ref = (lambda lq_: lambda s: reference(s, view(ids), view(lq_), **args))
    grad = grad_of(fn(lq), student, ups, view=view)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_within_rule(grad, grad_of(ref(lq.double()), student.double(), ups, view=view),
                       grad_of(ref(lq.float()), student, ups, torch.float32, view=view), f"{what} grad", backend)


@pytest.mark.parametrize("vocab,dtype,K", [(151936, torch.bfloat16, 64), (49152, torch.float32, 20),
                                           (1031, torch.float16, 7), (33, torch.float32, 1)],
                         ids=["151936-bf16-K64", "49152-fp32-K20", "1031-fp16-K7", "33-fp32-K1"])
def test_matches_float64_oracle(backend, vocab, dtype, K, gen):
    rows = 2 if vocab > 10_000 else (5 if backend.slow else 17)
    backend.require_float64_lse()
    for kind, temperature in (("random", 1.0), ("peaked", 0.7)):
        student = logits((rows, vocab), dtype, gen, kind, backend.device)
        _, ids, lq = _teacher_topk(student, gen, K)
        _check(backend, student, ids, lq, gen, f"{kind} T={temperature}", temperature)


def test_masks_unused_slots_and_layouts(backend, gen):
    """Masked rows give 0 / zero gradient; slots with id -1 or >= V (a padded teacher vocabulary) are unused; the
    LM-shift view logits[:, :-1] is read in place."""
    student = logits((3, 6, 101), torch.float32, gen, "random", backend.device)
    _, ids, lq = _teacher_topk(student, gen, 9)
    ids = ids.clone()
    ids[0, 1, 3], ids[1, 2, 0] = -1, 101 + 17              # unused slots: their teacher mass stays in the tail
    mask = torch.rand(3, 6, generator=gen).to(backend.device) > 0.3
    _check(backend, student, ids, lq, gen, "masked", mask=mask)
    _check(backend, student, ids, lq, gen, "lm-shift", view=lambda t: t[:, :-1])
    kl = ok.topk_kl(student, ids, lq, mask=mask)
    assert bool((kl[~mask] == 0).all())


def test_all_ids_give_the_exact_reverse_kl(backend, gen):
    """K = V: no tail bucket, the exact KL(p_S || p_T) of reverse_kl, forward and gradient."""
    student = logits((4, 50), torch.float32, gen, "random", backend.device)
    teacher, ids, lq = _teacher_topk(student, gen, 50)
    teacher = teacher.float().to(backend.device)
    torch.testing.assert_close(ok.topk_kl(student, ids, lq), ok.reverse_kl(student, teacher), rtol=1e-5, atol=2e-6)
    ups = (torch.randn(4, generator=gen).to(backend.device),)
    got = grad_of(lambda s: ok.topk_kl(s, ids, lq), student, ups)
    want = grad_of(lambda s: ok.reverse_kl(s, teacher), student, ups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_is_a_lower_bound_of_the_exact_kl(gen):
    """The (K + 1)-bucket KL never exceeds the full reverse KL of any teacher with these top-K values, is tight at
    K = V, and grows with K."""
    student = logits((64, 200), torch.float64, gen, "random")
    teacher = near_teacher(student, gen, 2.0)
    exact = reverse_kl_reference(student, teacher)
    lq = torch.log_softmax(teacher, -1)
    previous = torch.zeros(64, dtype=torch.float64)
    for K in (1, 4, 16, 64, 200):
        vals, ids = lq.topk(K, -1)
        bound = reference(student, ids, vals)
        assert bool((bound <= exact + 1e-12).all()) and bool((bound >= previous - 1e-12).all())
        previous = bound
    torch.testing.assert_close(previous, exact, rtol=1e-10, atol=1e-12)


def test_rejects_a_malformed_topk():
    x = torch.zeros(2, 10)
    ids = torch.tensor([[1, 1], [2, 3]])
    with pytest.raises(ValueError, match="repeat an id within a row"):
        ok.topk_kl(x, ids, torch.full((2, 2), -1.0))
    with pytest.raises(ValueError, match="sum to more than 1"):
        ok.topk_kl(x, torch.tensor([[1, 2], [2, 3]]), torch.zeros(2, 2))
    with pytest.raises(TypeError, match="topk_ids must be an int64 tensor"):
        ok.topk_kl(x, ids.int(), torch.zeros(2, 2))


def test_opd_advantages_topk_matches_oracle(backend, gen):
    """opd_advantages(kl="topk"): A - coef * KL_K with the student log-prob, from one log-prob row pass."""
    from opd_kernels.ops.opd_advantages import opd_advantages_reference
    student = logits((3, 5, 211), torch.bfloat16, gen, "peaked", backend.device)
    _, ids, lq = _teacher_topk(student, gen, 12)
    tokens = torch.randint(0, 211, (3, 5), generator=gen).to(backend.device)
    adv = torch.randn(3, 5, generator=gen).to(backend.device)
    mask = torch.rand(3, 5, generator=gen).to(backend.device) > 0.2
    kw = dict(teacher_topk_ids=ids, kl="topk", coef=0.7, temperature=0.9, mask=mask)
    got = ok.opd_advantages(student, tokens, adv, teacher_topk_logprobs=lq, **kw)
    oracle = opd_advantages_reference(student.double(), tokens, adv.double(), teacher_topk_logprobs=lq.double(), **kw)
    torch32 = opd_advantages_reference(student.float(), tokens, adv, teacher_topk_logprobs=lq, **kw)
    for name, g, o, t in zip(("advantages", "kl", "student_logprobs"), got, oracle, torch32):
        assert_within_rule(g, o, t, name, backend)
    assert max_err(got.kl, ok.topk_kl(student, ids, lq, temperature=0.9, mask=mask)) == 0.0
