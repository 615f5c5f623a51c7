r"""Advantage estimators (SPEC §1), before OPD shaping and before whitening.

Every estimator maps one scalar reward per sample plus per-token tensors to per-token ``(advantages, returns)``:

    rewards        [B]     one scalar task reward per sample; the samples of a prompt group are adjacent
    response_mask  [B, T]  right-padded response tokens, 1 = trainable token
    values         [B, T]  critic values V_t (ppo only)
    ref_kl         [B, T]  per-token KL to a reference model, e.g. k1 = logp_old - logp_ref (optional)
    -> advantages, returns: [B, T], exactly 0 where the mask is 0

Notation: sample i of group g(i), R_i its reward, m_t the mask, mu_g / sigma_g the group mean and unbiased std.

* ``grpo`` / ``gspo``: ``A_t = (R_i - mu_g) / (sigma_g + 1e-6)`` on every masked-in token; ``std_normalize=False``
  drops the division, ``rewards_normalize=False`` drops both (A = R). A group of one sample has sigma = 0 (its
  advantage is 0 when centred). GSPO differs only in the policy ratio (``loss.policy_loss(sequence_level_ratio=True)``).
* ``ppo``: token rewards ``r_t = -kl_coef * kl_ref_t`` with R added at the last masked-in token; GAE
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns_t = A_t + V_t``.
* ``reinforce_plus_plus``: the same token rewards; ``A_t = G_t = r_t + gamma G_{t+1}`` (no critic). Whitening is
  part of the method: see :data:`WHITENING_REQUIRED`.
* ``reinforce_plus_plus_baseline``: ``A_t = (R_i - mu_g) - kl_coef * kl_ref_t`` (``rewards_normalize=False``
  drops the centring); whitening is part of the method.

Masked-out tokens inside a response (e.g. tool output in a multi-turn rollout) are not steps of the decision
process: the recursions of ppo and reinforce_plus_plus skip them, so "t+1" is the next masked-in token and "V after
the end" is 0. Why: the critic is trained only on masked-in tokens (the value loss is masked), so its values at
other positions are untrained and must not be bootstrapped from. When the mask is a contiguous prefix (the usual
case), or gamma = lam = 1, this is exactly the position-indexed formula of SPEC §1.

For the estimators without a critic, ``returns`` equals ``advantages`` (nothing reads them; kept for one signature).
The estimators return detached tensors in float32 (float64 when an input is float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import as_bool_mask, check_2d, check_finite_where, check_same_shape, compute_dtype

GRPO_STD_EPS = 1e-6
# The estimators whose definition includes advantage whitening (REINFORCE++ and its baseline variant): a trainer
# must call ``whiten`` on their output (after ``apply_opd``), whatever its --normalize-advantages setting.
WHITENING_REQUIRED = frozenset({"reinforce_plus_plus", "reinforce_plus_plus_baseline"})


@dataclass(frozen=True)
class EstimatorInputs:
    """Validated inputs handed to an estimator (all tensors already in the compute dtype)."""
    rewards: torch.Tensor            # [B]
    mask: torch.Tensor               # [B, T] bool
    group_index: torch.Tensor | None  # [B] int64 in [0, num_groups), None when no grouping was given
    num_groups: int
    values: torch.Tensor | None      # [B, T]
    ref_kl: torch.Tensor | None      # [B, T], 0 where the mask is 0
    gamma: float
    lam: float
    kl_coef: float
    std_normalize: bool
    rewards_normalize: bool


Estimator = Callable[[EstimatorInputs], "tuple[torch.Tensor, torch.Tensor]"]
_REGISTRY: dict[str, Estimator] = {}
# Which estimators normalise rewards within prompt groups, and which put the reference KL into the advantage.
_GROUPED = frozenset({"grpo", "gspo", "reinforce_plus_plus_baseline"})
_USES_REF_KL = frozenset({"ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"})


def _register(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        _REGISTRY[name] = fn
        return fn
    return wrap


# --------------------------------------------------------------------------------------------- group statistics

def group_index_from(group_size: int | torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """Map ``group_size`` to a ``[B]`` int64 group index in ``[0, G)`` and the number of groups G.

    ``group_size`` is either an int n (every group has n samples, group k = samples ``k*n .. k*n+n-1``; B must be a
    multiple of n) or a ``[B]`` integer tensor of group ids (any values; equal ids = same group), which is how
    uneven groups are given, e.g. ``tensor([0, 0, 0, 1, 1])`` for groups of 3 and 2 samples.
    """
    if isinstance(group_size, torch.Tensor):
        if group_size.shape != (batch_size,) or group_size.is_floating_point() or group_size.dtype == torch.bool:
            raise ValueError(f"group_size as a tensor must be a [B] = [{batch_size}] integer tensor of group ids; "
                             f"got shape {tuple(group_size.shape)} dtype {group_size.dtype}")
        ids, index = torch.unique(group_size, return_inverse=True)
        return index.to(torch.int64), int(ids.numel())
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or a [B] tensor of group ids; got {group_size!r}")
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} samples is not a multiple of group_size={group_size}; pass a [B] "
                         "tensor of group ids for uneven groups")
    return torch.arange(batch_size) // group_size, batch_size // group_size


def group_mean_std(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group mean and unbiased group std of ``x`` [B] (std = 0 for a group of one sample)."""
    index = index.to(x.device)
    count = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, torch.ones_like(x))
    mean = torch.zeros_like(count).index_add_(0, index, x) / count                       # [G]
    sq_dev = (x - mean[index]) ** 2                                                      # [B]
    var = torch.zeros_like(count).index_add_(0, index, sq_dev) / (count - 1).clamp_min(1)
    return mean[index], var.sqrt()[index]


def _centred_rewards(inp: EstimatorInputs, *, scale: bool) -> torch.Tensor:
    """``(R - mu_g) / (sigma_g + eps)`` per sample, with the normalisation switches applied."""
    if not inp.rewards_normalize:
        return inp.rewards
    mean, std = group_mean_std(inp.rewards, inp.group_index, inp.num_groups)
    centred = inp.rewards - mean
    return centred / (std + GRPO_STD_EPS) if scale and inp.std_normalize else centred


# ----------------------------------------------------------------------------------------------- recursions

def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last masked-in token of each row (rows are assumed non-empty)."""
    T = mask.shape[1]
    return (T - 1) - mask.flip(-1).to(torch.int8).argmax(-1)


def _token_rewards(inp: EstimatorInputs) -> torch.Tensor:
    """``r_t = -kl_coef * kl_ref_t * m_t``, plus R at the last masked-in token: [B, T]."""
    r = torch.zeros(inp.mask.shape, dtype=inp.rewards.dtype, device=inp.mask.device)
    if inp.ref_kl is not None:
        r = r - inp.kl_coef * inp.ref_kl
    rows = torch.arange(r.shape[0], device=r.device)
    r[rows, last_token_index(inp.mask)] += inp.rewards
    return r


def discounted_reverse_cumsum(x: torch.Tensor, c: float, chunk: int = 128) -> torch.Tensor:
    """``y_t = x_t + c * y_{t+1}`` along the last dim of ``x`` [B, L] (y after the end = 0), for 0 <= c <= 1.

    A Python loop over t costs T launches per op (slow on GPUs for long responses). Here each chunk of ``chunk``
    steps is one matmul with the [chunk, chunk] matrix ``M[t, s] = c^(s-t)`` (s >= t), and only the carry between
    chunks, ``y_t += c^(chunk-t) * y_(next chunk start)``, loops: L / chunk iterations. Every power is <= 1 and at
    most ``chunk`` terms are summed, so nothing overflows (the closed form ``c^-t cumsum(c^t x)`` would).
    """
    B, L = x.shape
    steps = torch.arange(chunk, device=x.device)
    expo = (steps[None, :] - steps[:, None]).to(x.dtype)                                # [chunk, chunk]: s - t
    M = torch.where(expo >= 0, torch.full_like(expo, c).pow(expo.clamp_min(0)), torch.zeros_like(expo))
    xc = torch.nn.functional.pad(x, (0, -L % chunk)).view(B, -1, chunk)                 # [B, n, chunk]
    local = xc @ M.T                                                                     # [B, n, chunk]
    decay = torch.full((chunk,), c, dtype=x.dtype, device=x.device).pow((chunk - steps).to(x.dtype))
    out = torch.empty_like(local)
    carry = x.new_zeros(B, 1)
    for j in range(local.shape[1] - 1, -1, -1):
        out[:, j] = local[:, j] + decay * carry
        carry = out[:, j, :1]
    return out.view(B, -1)[:, :L]


def discounted_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """GAE over the masked-in tokens of each row (masked-out positions are skipped, see the module docstring).

    ``A_t = delta_t + gamma*lam*A_next``, ``delta_t = r_t + gamma*V_next - V_t``, where "next" is the next
    masked-in token (V and A after the last one are 0). With ``values = 0`` and ``lam = 1`` this is the discounted
    return ``G_t = r_t + gamma*G_next``. The masked-in tokens of each row are first packed to the left (a stable
    sort keeps their order), so "next" is simply t+1 and the recursion is one vectorised reverse scan.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)                  # [B, T] in-mask first
    packed_mask = mask.gather(1, order)                                                  # [B, T] prefix masks
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    r = torch.where(packed_mask, token_rewards.gather(1, order), zero)
    v = torch.where(packed_mask, values.gather(1, order), zero)                          # 0 past the end
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    delta = r + gamma * v_next - v                                                       # 0 past the end
    packed_adv = discounted_reverse_cumsum(delta, gamma * lam)
    adv = torch.zeros_like(packed_adv).scatter_(1, order, packed_adv)                   # unpack
    return torch.where(mask, adv, zero)


# ------------------------------------------------------------------------------------------------ estimators

def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_sample[:, None], torch.zeros((), dtype=per_sample.dtype, device=mask.device))


@_register("grpo")
def _grpo(inp: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    adv = _broadcast(_centred_rewards(inp, scale=True), inp.mask)
    return adv, adv


@_register("gspo")
def _gspo(inp: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    # Same advantages as GRPO; GSPO's difference (the sequence-level ratio) lives in policy_loss.
    return _grpo(inp)


@_register("ppo")
def _ppo(inp: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.where(inp.mask, inp.values, torch.zeros_like(inp.values))
    adv = discounted_gae(_token_rewards(inp), values, inp.mask, inp.gamma, inp.lam)
    returns = torch.where(inp.mask, adv + values, torch.zeros_like(adv))
    return adv, returns


@_register("reinforce_plus_plus")
def _reinforce_pp(inp: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    r = _token_rewards(inp)
    adv = discounted_gae(r, torch.zeros_like(r), inp.mask, inp.gamma, 1.0)
    return adv, adv


@_register("reinforce_plus_plus_baseline")
def _reinforce_pp_baseline(inp: EstimatorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    adv = _broadcast(_centred_rewards(inp, scale=False), inp.mask)
    if inp.ref_kl is not None:
        adv = adv - inp.kl_coef * inp.ref_kl
    return adv, adv


ESTIMATORS: tuple[str, ...] = tuple(_REGISTRY)


# ------------------------------------------------------------------------------------------------ public entry

def _check_scalars(gamma: float, lam: float, kl_coef: float) -> None:
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1]; got {v}")
    if not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be finite and >= 0; got {kl_coef}")


def _validate(estimator: str, rewards, response_mask, group_size, values, ref_kl, kl_coef,
              rewards_normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape/value checks in the order a user would fix them; returns (rewards [B], mask [B, T] bool)."""
    if estimator not in _REGISTRY:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    check_2d("response_mask", response_mask)
    rewards = torch.as_tensor(rewards)
    B = response_mask.shape[0]
    if rewards.shape != (B,):
        raise ValueError(f"rewards must be [B] = [{B}] (one scalar per sample); got shape {tuple(rewards.shape)}")
    mask = as_bool_mask(response_mask)
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sample(s) {empty} have no masked-in response token (fully masked); drop them from the "
                         "batch or give them at least one trainable token")
    if not bool(torch.isfinite(rewards.double()).all()):
        bad = (~torch.isfinite(rewards.double())).nonzero().flatten().tolist()
        raise ValueError(f"rewards are not finite at sample(s) {bad}; check the reward function")
    check_same_shape("response_mask", response_mask, values=values, ref_kl=ref_kl)
    for name, t in (("values", values), ("ref_kl", ref_kl)):
        if t is not None:
            check_finite_where(name, t, mask)
    if estimator == "ppo" and values is None:
        raise ValueError("estimator 'ppo' needs critic values: pass values=[B, T]")
    if kl_coef != 0 and estimator not in _USES_REF_KL:
        raise ValueError(f"estimator {estimator!r} does not put the reference KL into the advantage (kl_coef="
                         f"{kl_coef}); use policy_loss(ref_kl_coef=...) for a KL loss, or set kl_coef=0")
    if kl_coef != 0 and ref_kl is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_kl=[B, T] (e.g. logp_old - logp_ref on the response)")
    if estimator in _GROUPED and rewards_normalize and group_size is None:
        raise ValueError(f"estimator {estimator!r} normalises rewards within prompt groups: pass group_size (an int "
                         "n_samples_per_prompt, or a [B] tensor of group ids), or rewards_normalize=False")
    return rewards, mask


def compute_advantages(estimator: str, *, rewards: torch.Tensor, response_mask: torch.Tensor,
                       group_size: int | torch.Tensor | None = None, values: torch.Tensor | None = None,
                       ref_kl: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
                       kl_coef: float = 0.0, std_normalize: bool = True,
                       rewards_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages and returns of ``estimator`` (one of :data:`ESTIMATORS`), before OPD and whitening.

    Args:
        estimator: grpo, gspo, ppo, reinforce_plus_plus or reinforce_plus_plus_baseline (math: module docstring).
        rewards: [B] scalar task reward per sample (0 for every sample in pure distillation).
        response_mask: [B, T] right-padded, 1 = trainable response token; every row needs at least one.
        group_size: grpo/gspo/reinforce_plus_plus_baseline: an int n (groups of n adjacent samples) or a [B]
            integer tensor of group ids for uneven groups (equal id = same prompt). Ignored by ppo and
            reinforce_plus_plus.
        values: [B, T] critic values (ppo only).
        ref_kl: [B, T] per-token reference-model KL (ppo, reinforce_plus_plus[_baseline]); needed when
            ``kl_coef > 0``.
        gamma, lam: discount and GAE lambda in [0, 1] (lam is used by ppo only).
        kl_coef: weight of ``ref_kl`` in the token rewards / advantages.
        std_normalize: grpo/gspo divide by the group std (slime: --disable-grpo-std-normalization turns it off).
        rewards_normalize: centre (and scale) rewards within groups (slime: --disable-rewards-normalization).

    Returns:
        (advantages, returns), both [B, T], detached, 0 where the mask is 0.

    Raises:
        ValueError: unknown estimator, wrong shapes, non-binary mask, a fully masked sample (named by index),
            non-finite rewards, missing values / ref_kl / group_size where the estimator needs them.
    """
    gamma, lam, kl_coef = float(gamma), float(lam), float(kl_coef)
    _check_scalars(gamma, lam, kl_coef)
    rewards, mask = _validate(estimator, rewards, response_mask, group_size, values, ref_kl, kl_coef,
                              rewards_normalize)
    dtype = compute_dtype(rewards, values, ref_kl)
    device = response_mask.device
    index, num_groups = (None, 0)
    if group_size is not None and estimator in _GROUPED:
        index, num_groups = group_index_from(group_size, mask.shape[0])
        index = index.to(device)
    zero = torch.zeros((), dtype=dtype, device=device)
    inputs = EstimatorInputs(
        rewards=rewards.to(device=device, dtype=dtype),
        mask=mask,
        group_index=index,
        num_groups=num_groups,
        values=None if values is None else values.detach().to(dtype),
        ref_kl=None if ref_kl is None else torch.where(mask, ref_kl.detach().to(dtype), zero),
        gamma=gamma, lam=lam, kl_coef=kl_coef,
        std_normalize=bool(std_normalize), rewards_normalize=bool(rewards_normalize),
    )
    with torch.no_grad():
        return _REGISTRY[estimator](inputs)
