"""Advantage estimators against hand-computed cases (SPEC §1) and a plain-Python GAE."""
import math

import pytest
import torch

from opd_train.algo import ESTIMATORS, WHITENING_REQUIRED, compute_advantages
from opd_train.algo.advantages import discounted_reverse_cumsum

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------ GRPO / GSPO

def test_grpo_hand_computed_with_padding():
    # group 0: rewards 1, 0, 0 -> mean 1/3, unbiased std sqrt(1/3); group 1: all 2 -> std 0 -> advantage 0
    rewards = t([1, 0, 0, 2, 2, 2])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv, ret = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=3)
    std = math.sqrt(1 / 3)
    hi, lo = (2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)
    expected = t([[hi, hi, 0], [lo, 0, 0], [lo, lo, lo], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv)   # no critic: returns == advantages
    assert adv.dtype == F64


def test_grpo_normalisation_switches():
    rewards = t([3, 1, 0, 0])
    mask = torch.ones(4, 2)
    centred, _ = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=2, std_normalize=False)
    torch.testing.assert_close(centred[:, 0], t([1, -1, 0, 0]))
    raw, _ = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=2, rewards_normalize=False)
    torch.testing.assert_close(raw[:, 1], rewards)
    # rewards_normalize=False needs no grouping at all
    raw2, _ = compute_advantages("grpo", rewards=rewards, response_mask=mask, rewards_normalize=False)
    torch.testing.assert_close(raw2, raw)


def test_grpo_uneven_groups_from_group_ids():
    # groups of 3, 2 and 1 samples, given as ids; the ids need not be adjacent or sorted
    rewards = t([1, 2, 3, 10, 20, 7])
    ids = torch.tensor([4, 4, 9, 9, 4, 0])          # group 4: {1, 2, 20}; group 9: {3, 10}; group 0: {7}
    mask = torch.ones(6, 1)
    adv, _ = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=ids)
    g4 = torch.tensor([1.0, 2.0, 20.0], dtype=F64)
    g9 = torch.tensor([3.0, 10.0], dtype=F64)
    exp4 = (g4 - g4.mean()) / (g4.std() + 1e-6)
    exp9 = (g9 - g9.mean()) / (g9.std() + 1e-6)
    expected = t([exp4[0], exp4[1], exp9[0], exp9[1], exp4[2], 0.0])   # a lone sample gets 0
    torch.testing.assert_close(adv[:, 0], expected, rtol=0, atol=1e-12)


def test_gspo_advantages_equal_grpo():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, generator=g)
    mask = (torch.rand(8, 5, generator=g) > 0.3).int()
    mask[:, 0] = 1
    a1 = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=4)
    a2 = compute_advantages("gspo", rewards=rewards, response_mask=mask, group_size=4)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ PPO (GAE)

def test_ppo_hand_computed():
    # one sample, 3 tokens + 1 pad; gamma 0.5, lam 0.5, kl_coef 0.1, R = 1
    mask = torch.tensor([[1, 1, 1, 0]])
    values = t([[0.2, 0.4, 0.6, 99.0]])      # the pad's value must be ignored
    ref_kl = t([[1.0, -2.0, 0.5, 99.0]])
    adv, ret = compute_advantages("ppo", rewards=t([1.0]), response_mask=mask, values=values, ref_kl=ref_kl,
                                  gamma=0.5, lam=0.5, kl_coef=0.1)
    r = [-0.1, 0.2, -0.05 + 1.0]
    d2 = r[2] + 0.5 * 0 - 0.6                 # 0.35
    d1 = r[1] + 0.5 * 0.6 - 0.4               # 0.1
    d0 = r[0] + 0.5 * 0.4 - 0.2               # -0.1
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    torch.testing.assert_close(adv, t([[a0, a1, a2, 0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[a0 + 0.2, a1 + 0.4, a2 + 0.6, 0]]), rtol=0, atol=1e-12)


def _gae_plain(rewards, values, kl, mask, gamma, lam, kl_coef):
    """Plain-Python GAE, one sample at a time, over the masked-in tokens (SPEC §1 with masked tokens skipped)."""
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        steps = [j for j in range(T) if mask[i][j]]
        r = [-kl_coef * kl[i][j] for j in steps]
        r[-1] += rewards[i]
        v = [values[i][j] for j in steps] + [0.0]
        n = len(steps)
        for k, j in enumerate(steps):
            # SPEC: A_t = sum_s (gamma*lam)^(s-t) delta_s, delta_s = r_s + gamma V_{s+1} - V_s
            a = sum((gamma * lam) ** (s - k) * (r[s] + gamma * v[s + 1] - v[s]) for s in range(k, n))
            adv[i][j] = a
            ret[i][j] = a + v[k]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_plain_python_loop(gamma, lam, holes):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).int()
    if holes:  # masked-out tokens inside a response (tool output), never the first one
        mask = mask * (torch.rand(B, T, generator=g) > 0.3).int()
        mask[:, 0] = 1
    rewards = torch.randn(B, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    kl = torch.randn(B, T, generator=g, dtype=F64)
    adv, ret = compute_advantages("ppo", rewards=rewards, response_mask=mask, values=values, ref_kl=kl,
                                  gamma=gamma, lam=lam, kl_coef=0.3)
    exp_adv, exp_ret = _gae_plain(rewards.tolist(), values.tolist(), kl.tolist(), mask.tolist(), gamma, lam, 0.3)
    torch.testing.assert_close(adv, t(exp_adv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, t(exp_ret), rtol=1e-12, atol=1e-12)


def test_gae_over_several_scan_chunks_matches_plain_loop():
    """T = 300 spans three 128-step chunks of the vectorised scan; holes and uneven lengths included."""
    g = torch.Generator().manual_seed(2)
    B, T = 3, 300
    mask = (torch.rand(B, T, generator=g) > 0.2).int()
    mask[:, 0] = 1
    mask[1, 150:] = 0
    rewards, values, kl = (torch.randn(B, generator=g, dtype=F64), torch.randn(B, T, generator=g, dtype=F64),
                           torch.randn(B, T, generator=g, dtype=F64))
    adv, ret = compute_advantages("ppo", rewards=rewards, response_mask=mask, values=values, ref_kl=kl,
                                  gamma=0.995, lam=0.9, kl_coef=0.05)
    exp_adv, exp_ret = _gae_plain(rewards.tolist(), values.tolist(), kl.tolist(), mask.tolist(), 0.995, 0.9, 0.05)
    torch.testing.assert_close(adv, t(exp_adv), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, t(exp_ret), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L,chunk", [(1, 4), (7, 4), (8, 4), (37, 8), (200, 128)])
@pytest.mark.parametrize("c", [0.0, 0.5, 0.97, 1.0])
def test_discounted_reverse_cumsum_matches_the_recursion(L, chunk, c):
    x = torch.randn(3, L, generator=torch.Generator().manual_seed(L), dtype=F64)
    expected = torch.zeros_like(x)
    running = torch.zeros(3, dtype=F64)
    for i in range(L - 1, -1, -1):
        running = x[:, i] + c * running
        expected[:, i] = running
    torch.testing.assert_close(discounted_reverse_cumsum(x, c, chunk=chunk), expected, rtol=1e-12, atol=1e-12)


def test_discounted_reverse_cumsum_fp32_long_sequence():
    x = torch.full((2, 8192), 1e-3)
    y = discounted_reverse_cumsum(x, 1.0)
    torch.testing.assert_close(y[:, 0], torch.full((2,), 8.192), rtol=1e-5, atol=0)


# -------------------------------------------------------------------------------------------- REINFORCE++ family

def test_reinforce_plus_plus_hand_computed():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = t([[0.5, 1.0, -1.0], [2.0, 0.0, 7.0]])
    adv, ret = compute_advantages("reinforce_plus_plus", rewards=t([1.0, -1.0]), response_mask=mask, ref_kl=kl,
                                  gamma=0.5, kl_coef=0.2)
    # sample 0: r = [-0.1, -0.2, 0.2 + 1]; G_2 = 1.2, G_1 = -0.2 + 0.6 = 0.4, G_0 = -0.1 + 0.2 = 0.1
    # sample 1: r = [-0.4, 0 - 1]; G_1 = -1, G_0 = -0.4 - 0.5 = -0.9; the pad's kl (7) never enters
    torch.testing.assert_close(adv, t([[0.1, 0.4, 1.2], [-0.9, -1.0, 0.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv)
    assert "reinforce_plus_plus" in WHITENING_REQUIRED


def test_reinforce_plus_plus_baseline_hand_computed():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    kl = t([[1.0, 2.0], [3.0, 9.0], [0.0, -1.0]])
    adv, _ = compute_advantages("reinforce_plus_plus_baseline", rewards=t([1.0, 0.0, 5.0]), response_mask=mask,
                                ref_kl=kl, kl_coef=0.5, group_size=torch.tensor([0, 0, 1]))
    # group {1, 0}: mean 0.5 -> +0.5, -0.5; group {5}: centred 0. Minus 0.5 * kl per token.
    torch.testing.assert_close(adv, t([[0.0, -0.5], [-2.0, 0.0], [0.0, 0.5]]), rtol=0, atol=1e-12)
    assert "reinforce_plus_plus_baseline" in WHITENING_REQUIRED


# ---------------------------------------------------------------------------------------------- shared contract

def _inputs(estimator, B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.4).int()
    mask[:, 0] = 1
    kw = dict(rewards=torch.randn(B, generator=g), response_mask=mask, group_size=2)
    if estimator == "ppo":
        kw["values"] = torch.randn(B, T, generator=g)
    return kw


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_outputs_are_zero_where_masked_and_detached(estimator):
    kw = _inputs(estimator)
    if "values" in kw:
        kw["values"].requires_grad_(True)
    adv, ret = compute_advantages(estimator, **kw)
    off = kw["response_mask"] == 0
    assert adv.shape == ret.shape == kw["response_mask"].shape
    assert bool((adv[off] == 0).all()) and bool((ret[off] == 0).all())
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.dtype == torch.float32


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fully_masked_sample_is_named(estimator):
    kw = _inputs(estimator)
    kw["response_mask"][2] = 0
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\].*fully masked"):
        compute_advantages(estimator, **kw)


@pytest.mark.parametrize("change,match", [
    (dict(estimator="dapo"), "unknown advantage estimator 'dapo'"),
    (dict(rewards=torch.zeros(3)), r"rewards must be \[B\] = \[4\]"),
    (dict(rewards=torch.tensor([0.0, float("nan"), 0.0, 0.0])), r"not finite at sample\(s\) \[1\]"),
    (dict(response_mask=torch.full((4, 6), 2)), "only 0 and 1"),
    (dict(response_mask=torch.ones(4)), r"must be \[B, T\]"),
    (dict(group_size=3), "not a multiple of group_size=3"),
    (dict(group_size=None), "pass group_size"),
    (dict(group_size=torch.tensor([0.0, 0.0, 1.0, 1.0])), "integer tensor of group ids"),
    (dict(kl_coef=0.1, ref_kl=torch.zeros(4, 6)), "does not put the reference KL"),
    (dict(estimator="ppo"), "needs critic values"),
    (dict(estimator="reinforce_plus_plus", kl_coef=0.1), "needs ref_kl"),
    (dict(estimator="ppo", values=torch.zeros(4, 5)), r"values has shape \(4, 5\)"),
    (dict(estimator="reinforce_plus_plus", gamma=1.5), r"gamma must be in \[0, 1\]"),
    (dict(estimator="ppo", values=torch.full((4, 6), float("inf"))), "values is not finite at index"),
])
def test_bad_input_gets_a_clear_error(change, match):
    kw = dict(estimator="grpo", **_inputs("grpo"))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        compute_advantages(kw.pop("estimator"), **kw)


def test_the_registry_is_the_flag_vocabulary():
    """--advantage-estimator's choices (opd_train.types) are exactly the registered estimators."""
    from opd_train import types
    from opd_train.config import AlgoConfig
    from dataclasses import fields
    choices = next(f for f in fields(AlgoConfig) if f.name == "advantage_estimator").metadata["choices"]
    assert tuple(ESTIMATORS) == types.ESTIMATORS == tuple(choices)
