"""Policy loss (PPO clip, dual clip, GSPO ratio, reductions, entropy, ref-KL) and the clipped value loss."""
import math

import pytest
import torch

from opd_train.algo import kl_estimate, loss_normalizer, policy_loss, value_loss

F64 = torch.float64


def _leaf(x):
    return torch.tensor(x, dtype=F64, requires_grad=True)


def test_clipped_surrogate_hand_computed():
    # one sample, 4 tokens: ratios e^{0.5}, e^{-0.5}, e^{0.1}, e^{0.5}; advantages +1, -1, +2, -1
    old = torch.zeros(1, 4, dtype=F64)
    new = _leaf([[0.5, -0.5, 0.1, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]], dtype=F64)
    loss, metrics = policy_loss(new, old, adv, torch.ones(1, 4), eps_clip=0.2)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), math.exp(0.5)]
    per_token = [
        max(-r[0] * 1, -1.2 * 1),    # A > 0, ratio above 1 + eps: clipped at 1.2
        max(-r[1] * -1, -0.8 * -1),  # A < 0, ratio below 1 - eps: clipped at 0.8
        max(-r[2] * 2, -r[2] * 2),   # inside the range
        max(-r[3] * -1, -1.2 * -1),  # A < 0, ratio above: unclipped (pessimistic) branch
    ]
    assert math.isclose(loss.item(), sum(per_token) / 4, rel_tol=1e-12)
    assert float(metrics["clipfrac"]) == 0.5
    assert math.isclose(float(metrics["approx_kl"]), -(0.5 - 0.5 + 0.1 + 0.5) / 4, rel_tol=1e-12)
    loss.backward()
    # gradient d loss / d new_t = -A_t ratio_t / 4 where unclipped, 0 where clipped
    expected = [0.0, 0.0, -2 * r[2] / 4, r[3] / 4]
    torch.testing.assert_close(new.grad, torch.tensor([expected], dtype=F64))


def test_asymmetric_clip_and_dual_clip():
    old = torch.zeros(1, 3, dtype=F64)
    new = _leaf([[0.25, 3.0, 3.0]])                # ratios 1.28, e^3, e^3
    adv = torch.tensor([[1.0, -1.0, 1.0]], dtype=F64)
    loss, m = policy_loss(new, old, adv, torch.ones(1, 3), eps_clip=0.2, eps_clip_high=0.3, dual_clip=3.0)
    # token 0: 1.28 < 1.3 -> unclipped; token 1: A < 0, loss e^3 capped at 3; token 2: A > 0 -> clip at 1.3
    assert math.isclose(loss.item(), (-math.exp(0.25) + 3.0 - 1.3) / 3, rel_tol=1e-12)
    assert math.isclose(float(m["dual_clipfrac"]), 1 / 3) and math.isclose(float(m["clipfrac"]), 1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-math.exp(0.25) / 3, 0.0, 0.0]], dtype=F64))


def _gspo_reference(new, old, adv_seq, mask, eps):
    """GSPO as published: one sequence ratio (gradient through the length-normalised sum), clipped per sequence."""
    m = mask.to(new.dtype)
    s = torch.exp(((new - old) * m).sum(-1) / m.sum(-1))                                # [B]
    per_seq = torch.maximum(-adv_seq * s, -adv_seq * s.clamp(1 - eps, 1 + eps))
    return per_seq.mean()


def test_gspo_ratio_equals_published_gspo_for_sequence_advantages():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    old = -torch.rand(B, T, generator=g, dtype=F64)
    new = (old + 0.15 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    adv_seq = torch.tensor([1.0, -2.0, 0.5, -0.3], dtype=F64)
    loss, m = policy_loss(new, old, adv_seq[:, None].expand(B, T), mask, eps_clip=0.02, sequence_level_ratio=True)
    (g1,) = torch.autograd.grad(loss, new)
    ref_new = new.detach().clone().requires_grad_(True)
    ref = _gspo_reference(ref_new, old, adv_seq, mask, 0.02)
    (g2,) = torch.autograd.grad(ref, ref_new)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g1, g2)
    assert 0 < float(m["clipfrac"]) < 1            # eps 0.02: some sequences clipped, some not


def test_gspo_token_gradient_keeps_per_token_advantages():
    old = torch.zeros(1, 3, dtype=F64)
    new = _leaf([[0.03, -0.03, 0.06]])             # sequence log-ratio 0.02 -> ratio e^0.02 inside the clip range
    adv = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
    loss, m = policy_loss(new, old, adv, torch.ones(1, 3), sequence_level_ratio=True)
    s = math.exp(0.02)
    assert math.isclose(float(m["ratio_mean"]), s, rel_tol=1e-12)
    assert math.isclose(float(m["ratio_min"]), s, rel_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0 * s, 2.0 * s, -3.0 * s]], dtype=F64) / 3)


def _random_batch(B=8, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3)
    mask[:, 0] = True
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    new = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    return new, old, adv, mask


def test_reductions_hand_computed():
    new, old, adv, mask = _random_batch()
    kw = dict(eps_clip=10.0 - 9.5)                 # 0.5: irrelevant here, ratio = 1
    same = old.clone()
    sample, _ = policy_loss(same, old, adv, mask, reduction="sample_mean", **kw)
    token, _ = policy_loss(same, old, adv, mask, reduction="token_mean", **kw)
    m = mask.to(F64)
    per_sample = (-adv * m).sum(-1) / m.sum(-1)
    assert math.isclose(float(sample), float(per_sample.mean()), rel_tol=1e-12)
    assert math.isclose(float(token), float((-adv * m).sum() / m.sum()), rel_tol=1e-12)
    half, _ = policy_loss(same, old, adv, mask, reduction="sample_mean", num_samples=16)
    assert math.isclose(float(half), float(sample) / 2, rel_tol=1e-12)


@pytest.mark.parametrize("reduction", ["sample_mean", "token_mean"])
@pytest.mark.parametrize("dp_averages", [False, True])
def test_microbatches_and_data_parallel_give_the_big_batch_gradient(reduction, dp_averages):
    """2 ranks x 2 micro-batches with the documented normalisers == one big batch."""
    new, old, adv, mask = _random_batch(B=8)
    big = new.clone().requires_grad_(True)
    loss, _ = policy_loss(big, old, adv, mask, reduction=reduction, sequence_level_ratio=False)
    (g_big,) = torch.autograd.grad(loss, big)

    W = 2
    count = 8 if reduction == "sample_mean" else int(mask.sum())
    norm = loss_normalizer(count, dp_world_size=W, dp_averages_gradients=dp_averages, num_microbatches=2)
    key = "num_samples" if reduction == "sample_mean" else "num_tokens"
    leaf = new.clone().requires_grad_(True)
    rank_grads = []
    for rank in range(W):
        acc = torch.zeros_like(leaf)
        for micro in range(2):                                          # gradient accumulation sums
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            part, _ = policy_loss(leaf[rows], old[rows], adv[rows], mask[rows], reduction=reduction, **{key: norm})
            (gr,) = torch.autograd.grad(part, leaf)
            acc += gr
        rank_grads.append(acc)
    reduced = sum(rank_grads) / (W if dp_averages else 1)              # the DP all-reduce
    torch.testing.assert_close(reduced, g_big, rtol=1e-12, atol=1e-14)


def test_megatron_style_schedule_normaliser():
    assert loss_normalizer(64, dp_world_size=4, num_microbatches=2, schedule_divides_by_microbatches=True) == 8
    assert loss_normalizer(64, dp_world_size=4, dp_averages_gradients=False) == 64
    with pytest.raises(ValueError, match="global_count > 0"):
        loss_normalizer(0)


def test_entropy_bonus_and_reference_kl_loss():
    new, old, adv, mask = _random_batch()
    new = new.requires_grad_(True)
    g = torch.Generator().manual_seed(9)
    entropy = torch.rand(new.shape, generator=g, dtype=F64).requires_grad_(True)
    ref = old - 0.2 * torch.rand(new.shape, generator=g, dtype=F64)
    base, _ = policy_loss(new, old, adv, mask)
    m = mask.to(F64)

    def sample_mean(x):
        return float(((x * m).sum(-1) / m.sum(-1)).mean())

    with_ent, met = policy_loss(new, old, adv, mask, entropy=entropy, entropy_coef=0.01)
    assert math.isclose(with_ent.item(), base.item() - 0.01 * sample_mean(entropy.detach()), rel_tol=1e-12)
    (ge,) = torch.autograd.grad(with_ent, entropy)
    torch.testing.assert_close(ge, -0.01 * m / m.sum(-1, keepdim=True) / 8)
    for kind in ("k1", "k2", "k3"):
        with_kl, met = policy_loss(new, old, adv, mask, ref_logprobs=ref, ref_kl_coef=0.1, ref_kl=kind)
        kl = kl_estimate(new.detach(), ref, kind)
        assert math.isclose(with_kl.item(), base.item() + 0.1 * sample_mean(kl), rel_tol=1e-12)
        assert math.isclose(float(met["ref_kl"]), float(kl[mask].mean()), rel_tol=1e-12)
    # k3's gradient w.r.t. new is 1 - exp(ref - new) per token (the low-variance KL's)
    only_kl, _ = policy_loss(new, new.detach(), torch.zeros_like(adv), mask, ref_logprobs=ref, ref_kl_coef=1.0)
    (gk,) = torch.autograd.grad(only_kl, new)
    expected = (1 - torch.exp(ref - new.detach())) * m / m.sum(-1, keepdim=True) / 8
    torch.testing.assert_close(gk, expected)


def test_padding_garbage_never_reaches_the_loss_or_the_gradient():
    new, old, adv, mask = _random_batch()
    clean, _ = policy_loss(new, old, adv, mask, sequence_level_ratio=True)
    dirty_new = torch.where(mask, new, torch.full_like(new, -float("inf"))).requires_grad_(True)
    dirty_adv = torch.where(mask, adv, torch.full_like(adv, float("nan")))
    ref = torch.where(mask, old, torch.full_like(old, float("inf")))
    for seq in (False, True):
        loss, metrics = policy_loss(dirty_new, old, dirty_adv, mask, sequence_level_ratio=seq, ref_logprobs=ref,
                                    ref_kl_coef=0.1, ref_kl="k3")
        (grad,) = torch.autograd.grad(loss, dirty_new)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
        assert bool((grad[~mask] == 0).all())
        assert all(bool(torch.isfinite(v)) for v in metrics.values())
    loss, _ = policy_loss(dirty_new, old, dirty_adv, mask, sequence_level_ratio=True)
    torch.testing.assert_close(loss, clean)


def test_extreme_ratio_with_zero_advantage_stays_finite():
    old = torch.zeros(1, 2, dtype=F64)
    new = _leaf([[200.0, 0.0]])
    loss, _ = policy_loss(new, old, torch.tensor([[0.0, 1.0]], dtype=F64), torch.ones(1, 2))
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(new.grad).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="seq_sum"), "unknown reduction 'seq_sum'"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(eps_clip=1.0), "eps_clip must be < 1"),
    (dict(eps_clip_high=-0.1), "eps_clip_high must be finite and >= 0"),
    (dict(entropy_coef=0.1), "needs entropy"),
    (dict(ref_kl_coef=0.1), "needs ref_logprobs"),
    (dict(ref_kl="k9"), "unknown ref_kl estimator"),
    (dict(num_samples=0), "num_samples must be > 0"),
])
def test_policy_loss_bad_arguments(kwargs, match):
    new, old, adv, mask = _random_batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(new, old, adv, mask, **kwargs)
    with pytest.raises(ValueError, match=r"advantages has shape \(8, 5\)"):
        policy_loss(new, old, adv[:, :5], mask)


def test_value_loss_clipped_hand_computed():
    values = _leaf([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]], dtype=F64)
    returns = torch.tensor([[2.0, 1.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, value_clip=0.2)
    # token 0: plain (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 0.845; token 1: plain = clipped = 1 -> 0.5
    assert math.isclose(loss.item(), (0.845 + 0.5) / 2, rel_tol=1e-12)
    assert math.isclose(float(m["value_clipfrac"]), 0.5)
    loss.backward()
    # token 0 takes the clipped branch (V outside old +- 0.2): no gradient; token 1: (V - G) / 2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.5, 0.0]], dtype=F64))
    plain, _ = value_loss(values, old, returns, mask, value_clip=None, reduction="token_mean")
    assert math.isclose(plain.item(), (0.5 * 1 + 0.5 * 1) / 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="value_clip must be finite and > 0"):
        value_loss(values, old, returns, mask, value_clip=0.0)
