"""OPD shaping: KL estimator definitions, the sanity laws of SPEC §1, and agreement with the fused kernel path."""
import math

import pytest
import torch

import opd_kernels
from opd_train.algo import ESTIMATORS, apply_opd, apply_opd_kl, compute_advantages, kl_estimate, policy_loss

F64 = torch.float64


def test_kl_estimator_definitions():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=F64)
    ref = torch.tensor([-1.0, -1.0, -2.5, -0.1], dtype=F64)
    d = lp - ref
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), 0.5 * d ** 2)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.exp(-d) - 1 + d)
    assert kl_estimate(lp, ref, "k1")[0] == 0 and kl_estimate(lp, ref, "k3")[0] == 0
    assert bool((kl_estimate(lp, ref, "k2") >= 0).all()) and bool((kl_estimate(lp, ref, "k3") >= 0).all())
    # k3 keeps relative precision for tiny d (expm1), where exp(-d) - 1 + d in fp32 would round to 0
    tiny = torch.tensor([1e-4])
    torch.testing.assert_close(kl_estimate(tiny, torch.zeros(1), "k3"), torch.tensor([0.5e-8]), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(lp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_apply_opd_shapes_the_advantage_and_leaves_padding(kind):
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 5, generator=g)
    s, te = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]])
    te_padded = torch.where(mask.bool(), te, torch.full_like(te, float("nan")))   # padding may be anything
    out, kl = apply_opd(adv, s, te_padded, coef=0.7, kl=kind, response_mask=mask)
    expected_kl = torch.where(mask.bool(), kl_estimate(s, te, kind), torch.zeros(()))
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(out, adv - 0.7 * expected_kl)
    assert bool((out[mask == 0] == adv[mask == 0]).all())          # masked tokens keep their advantage


def test_apply_opd_is_detached_and_checks_input():
    adv = torch.zeros(2, 3, requires_grad=True)
    s = torch.zeros(2, 3, requires_grad=True)
    out, kl = apply_opd(adv, s, torch.full((2, 3), -1.0))
    assert not out.requires_grad and not kl.requires_grad
    with pytest.raises(ValueError, match=r"teacher_logprobs is not finite at index \(1, 2\)"):
        apply_opd(adv, s, torch.tensor([[0.0, 0, 0], [0, 0, float("nan")]]))
    with pytest.raises(ValueError, match="coef must be finite and >= 0"):
        apply_opd(adv, s, s, coef=-1)
    with pytest.raises(ValueError, match="apply_opd_kl"):
        apply_opd(adv, s, s, kl="full")
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(2, 2\)"):
        apply_opd(adv, s, torch.zeros(2, 2))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_student_equal_to_teacher_gives_zero_penalty(kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 33, generator=g)
    tokens = torch.randint(0, 33, (4, 7), generator=g)
    lp = opd_kernels.token_logprobs(logits, tokens)
    adv = torch.randn(4, 7, generator=g)
    out, kl = apply_opd(adv, lp, lp.clone(), kl=kind)
    assert bool((kl == 0).all())
    torch.testing.assert_close(out, adv, rtol=0, atol=0)
    # full mode: the exact KL of identical rows is 0 (up to fp32 rounding of the kernel)
    exact = opd_kernels.reverse_kl(logits, logits.clone())
    out_full, kl_full = apply_opd_kl(adv, exact)
    assert float(kl_full.abs().max()) < 1e-6
    torch.testing.assert_close(out_full, adv, rtol=0, atol=1e-6)


def _student_teacher(rows=6, vocab=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g) * 1.5                  # fp32: the kernels' input dtype
    teacher = student + torch.randn(rows, vocab, generator=g)              # related but different
    return student, teacher, g


def _all_token_logprobs(logits):
    """[rows, V] log p of every vocabulary id, through the opd_kernels log-prob op."""
    rows, V = logits.shape
    ids = torch.arange(V).expand(rows, V)
    return opd_kernels.token_logprobs(logits.unsqueeze(1).expand(rows, V, V), ids).double()


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_mean_sampled_kl_converges_to_exact_reverse_kl(kind):
    """k1 and k3 are unbiased: their mean over a ~ p_S is KL(p_S || p_T) from opd_kernels.reverse_kl."""
    student, teacher, g = _student_teacher()
    exact = opd_kernels.reverse_kl(student, teacher).double()                           # [rows]
    lp_s, lp_t = _all_token_logprobs(student), _all_token_logprobs(teacher)             # [rows, V]
    n = 200_000
    samples = torch.multinomial(lp_s.exp(), n, replacement=True, generator=g)           # [rows, n]
    _, kl = apply_opd(torch.zeros(samples.shape, dtype=F64), lp_s.gather(1, samples), lp_t.gather(1, samples),
                      kl=kind)
    mean, sem = kl.mean(1), kl.std(1) / math.sqrt(n)
    assert bool((exact > 0.05).all())
    assert bool(((mean - exact).abs() < 5 * sem).all()), (mean, exact, sem)
    assert float(sem.max()) < 0.02 * float(exact.min())      # the tolerance is tight relative to the KL itself


def test_policy_gradient_with_minus_k1_advantage_is_the_reverse_kl_gradient():
    """One-step toy: E[grad of policy_loss with A = -k1] == autograd grad of the exact KL(p_S || p_T)."""
    g = torch.Generator().manual_seed(3)
    V, n = 12, 400_000
    theta = (torch.randn(V, generator=g) * 1.5).requires_grad_(True)      # student logits (fp32, a leaf)
    teacher = torch.randn(V, generator=g)
    exact_kl = opd_kernels.reverse_kl(theta[None], teacher[None])[0]
    (exact_grad,) = torch.autograd.grad(exact_kl, theta)

    lp_s_all = torch.log_softmax(theta.double(), -1)
    lp_t_all = torch.log_softmax(teacher.double(), -1)
    a = torch.multinomial(lp_s_all.detach().exp(), n, replacement=True, generator=g)    # [n] tokens ~ p_S
    new = lp_s_all[a][:, None]                                                          # [n, 1] differentiable
    adv, d = apply_opd(torch.zeros(n, 1, dtype=F64), new.detach(), lp_t_all[a][:, None])   # pure distillation
    loss, _ = policy_loss(new, new.detach(), adv, torch.ones(n, 1), reduction="token_mean")
    (pg_grad,) = torch.autograd.grad(loss, theta)

    # per-sample gradient d_i (onehot(a_i) - p): its std gives the statistical tolerance of the mean
    per_sample = d * (torch.nn.functional.one_hot(a, V) - lp_s_all.detach().exp())      # [n, V]
    sem = per_sample.std(0).float() / math.sqrt(n)
    assert bool(((pg_grad - exact_grad).abs() < 5 * sem + 1e-6).all()), (pg_grad, exact_grad, sem)
    assert 5 * float(sem.max()) < 0.1 * float(exact_grad.abs().max())      # the test can tell a wrong gradient
    # and one gradient step on the estimate lowers the exact KL
    with torch.no_grad():
        stepped = theta - 0.5 * pg_grad
    assert float(opd_kernels.reverse_kl(stepped[None], teacher[None])[0]) < float(exact_kl.detach()) - 1e-3


def _exact_policy_gradient(kind: str, theta: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """E_{a ~ p}[grad of policy_loss with A = -k(d)] summed exactly over the V tokens (no sampling)."""
    V = theta.shape[0]
    lp_s = torch.log_softmax(theta, -1)
    p = lp_s.detach().exp()
    a = torch.arange(V)
    new = lp_s[a][:, None]                                                               # [V, 1], one row per token
    adv, _ = apply_opd(torch.zeros(V, 1, dtype=F64), new.detach(), lp_t[a][:, None], kl=kind)
    loss, _ = policy_loss(new, new.detach(), adv * p[:, None], torch.ones(V, 1), reduction="token_mean",
                          num_tokens=1.0)                                                # weight token a by p(a)
    return torch.autograd.grad(loss, theta)[0]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_what_each_estimator_optimises_as_an_advantage(kind):
    """The expected policy gradient of each detached advantage, exactly, against the gradient of the objective the
    docstring (algo/opd.py) and --help name: k1 -> KL(p||q); k2 -> E_p[d^2/2] - KL(p||q); k3 -> KL(p||q) - KL(q||p).
    A loose claim (k3 "unbiased" for the reverse KL) fails here: its gradient differs from grad KL(p||q)."""
    g = torch.Generator().manual_seed(11)
    theta = (torch.randn(9, generator=g, dtype=F64) * 1.5).requires_grad_(True)       # student logits
    lp_t = torch.log_softmax(torch.randn(9, generator=g, dtype=F64), -1)               # teacher log-probs
    lp_s = torch.log_softmax(theta, -1)
    p, q = lp_s.exp(), lp_t.exp()
    reverse, forward = (p * (lp_s - lp_t)).sum(), (q * (lp_t - lp_s)).sum()
    objective = {"k1": reverse, "k2": (p * 0.5 * (lp_s - lp_t) ** 2).sum() - reverse, "k3": reverse - forward}[kind]
    want = torch.autograd.grad(objective, theta, retain_graph=True)[0]
    got = _exact_policy_gradient(kind, theta, lp_t)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    reverse_grad = torch.autograd.grad(reverse, theta)[0]
    if kind == "k1":
        torch.testing.assert_close(got, reverse_grad, rtol=1e-9, atol=1e-12)
    else:                                                   # not the reverse-KL gradient
        assert float((got - reverse_grad).abs().max()) > 0.05 * float(reverse_grad.abs().max())


@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "ppo"])
def test_zero_task_reward_plus_opd_is_pure_distillation(estimator):
    g = torch.Generator().manual_seed(4)
    B, T = 6, 5
    mask = (torch.rand(B, T, generator=g) > 0.3).int()
    mask[:, 0] = 1
    s, te = -torch.rand(B, T, generator=g) * 4, -torch.rand(B, T, generator=g) * 4
    adv, ret = compute_advantages(estimator, rewards=torch.zeros(B), response_mask=mask, group_size=3)
    shaped, d = apply_opd(adv, s, te, coef=0.5, response_mask=mask)
    torch.testing.assert_close(shaped, torch.where(mask.bool(), -0.5 * (s - te), torch.zeros(())), rtol=0, atol=0)
    assert bool((ret == 0).all())                                        # OPD never enters the returns


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_apply_opd_matches_the_fused_kernel_path(kind):
    """A trainer holding logits may call opd_kernels.opd_advantages instead: the same numbers."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 50, generator=g)
    tokens = torch.randint(0, 50, (3, 6), generator=g)
    teacher_lp = -torch.rand(3, 6, generator=g) * 5
    adv = torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    fused = opd_kernels.opd_advantages(logits, tokens, adv, teacher_logprobs=teacher_lp, coef=0.3, kl=kind,
                                       temperature=0.8, mask=mask)
    student_lp = opd_kernels.token_logprobs(logits, tokens, temperature=0.8)
    out, kl = apply_opd(adv, student_lp, teacher_lp, coef=0.3, kl=kind, response_mask=mask)
    torch.testing.assert_close(out, fused.advantages, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, fused.kl, rtol=1e-5, atol=1e-5)


def test_apply_opd_kl_matches_the_fused_full_kl_path():
    g = torch.Generator().manual_seed(6)
    s, te = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    tokens = torch.randint(0, 64, (2, 5), generator=g)
    adv = torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    fused = opd_kernels.opd_advantages(s, tokens, adv, teacher_logits=te, kl="full", coef=2.0, mask=mask)
    out, kl = apply_opd_kl(adv, opd_kernels.reverse_kl(s, te), coef=2.0, response_mask=mask)
    torch.testing.assert_close(out, fused.advantages, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, fused.kl, rtol=1e-5, atol=1e-5)
    assert bool((kl[mask == 0] == 0).all()) and bool((kl[mask == 1] > 0).all())
