r"""Clipped policy loss (PPO / GRPO / GSPO) with entropy bonus and reference-KL loss, and the clipped value loss.

Policy loss per token (A = the detached, OPD-shaped, possibly whitened advantage; new/old = log-probs of the sampled
token under the current / behaviour policy):

    ratio_t = exp(new_t - old_t)                                   (log-ratio clamped to [-20, 20], see below)
    l_t     = max(-ratio_t A_t, -clip(ratio_t, 1 - eps, 1 + eps_high) A_t)
    dual clip c > 1 (Ye et al. 2020): for A_t < 0, l_t = min(l_t, -c A_t)   (bounds the loss of a huge ratio)

GSPO (``sequence_level_ratio=True``): the ratio of sample i is the length-normalised sequence ratio
``s_i = exp(sum_t m_t (new_t - old_t) / max(sum_t m_t, 1))`` (= exp(-seq_kl_i) of SPEC §1) for every token. Because
OPD advantages differ per token, the token ratio is GSPO-token's ``s_i,t = sg(s_i) * exp(new_t - sg(new_t))``: its
value is s_i (so clipping is per sequence), its gradient is ``s_i grad new_t`` (so every token keeps its own
advantage). For a constant advantage per sequence this has exactly GSPO's gradient (tested); slime's form, a
gradient through the sequence mean, would average the per-token OPD signal over the whole response.

Reductions (the normalisers are what make micro-batching and data parallelism give the one-big-batch gradient):

    sample_mean:  loss = sum_i [ sum_t m l_t / max(sum_t m, 1) ] / num_samples      (default num_samples = B)
    token_mean:   loss = sum_{i,t} m l_t / num_tokens                               (default = local sum m)

How a trainer must pass them: let N be the number of samples (token_mean: masked-in tokens) in the GLOBAL batch of
one optimiser step, over all micro-batches and all data-parallel ranks. Each micro-batch's loss is a partial sum
divided by the same constant, so gradients add up across micro-batches and ranks to ``grad (1/N) sum_i ...``:
  * gradients summed over micro-batches (plain accumulation) and SUMMED over ranks: pass N;
  * summed over micro-batches, AVERAGED over W ranks (torch DDP; Megatron-core DDP by default): pass N / W;
  * additionally, if the framework divides each micro-batch loss by the number of micro-batches M (Megatron-core
    0.19's ``forward_step`` does when the loss function returns two values ``(loss, reduced)``): pass N / (W * M).
:func:`loss_normalizer` computes this; ``tests/algo/test_algo_loss.py`` shows the equality with one big batch.
Context parallelism (a sample's tokens split over ranks) is not covered: "sample_mean" would divide by the local
part of each sample's length; use "token_mean" there.

The log-ratio clamp: ``exp`` of a log-ratio above ~88 is inf in fp32, and a token with A = 0 then gives
``0 * inf = NaN`` in the loss and its backward. A ratio beyond e^20 is far outside any clip range; its gradient is
0 for A > 0 (clipped anyway), and for A < 0 the (otherwise explosive) gradient is dropped: use ``dual_clip`` to
bound it smoothly instead.
"""
from __future__ import annotations

import math

import torch

from ._checks import as_bool_mask, check_2d, check_coef, check_same_shape
from .opd import kl_estimate
from .whiten import masked_mean

# Estimators of the reference-KL loss: the sampled ones, and slime's low_var_kl (k3 clamped to [-10, 10]).
REF_KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOW_VAR_KL_CLAMP = 10.0

REDUCTIONS = ("sample_mean", "token_mean")
LOG_RATIO_CLAMP = 20.0


def loss_normalizer(global_count: float, *, dp_world_size: int = 1, dp_averages_gradients: bool = True,
                    num_microbatches: int = 1, schedule_divides_by_microbatches: bool = False) -> float:
    """The ``num_samples`` / ``num_tokens`` to pass so that the accumulated gradient equals the global-batch one.

    ``global_count``: samples (sample_mean) or masked-in tokens (token_mean) in the global batch of one step.
    The other arguments describe what the training framework does to each micro-batch loss afterwards.
    """
    if global_count <= 0 or dp_world_size < 1 or num_microbatches < 1:
        raise ValueError("loss_normalizer needs global_count > 0, dp_world_size >= 1, num_microbatches >= 1; got "
                         f"{global_count}, {dp_world_size}, {num_microbatches}")
    n = float(global_count)
    if dp_averages_gradients:
        n /= dp_world_size
    if schedule_divides_by_microbatches:
        n /= num_microbatches
    return n


def _check_normalizer(name: str, value) -> None:
    if value is None or isinstance(value, torch.Tensor):
        return
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be > 0 (the global-batch count, see loss_normalizer); got {value}")


def reduce_tokens(x: torch.Tensor, mask: torch.Tensor, reduction: str = "sample_mean", *,
                  num_samples: float | torch.Tensor | None = None,
                  num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token quantity ``x`` [B, T] to a scalar with the module's reductions (differentiable).

    Masked-out entries never reach the result, even as NaN/Inf.
    """
    m = as_bool_mask(mask, "mask")
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))            # [B, T]
    if reduction == "sample_mean":
        _check_normalizer("num_samples", num_samples)
        per_sample = xm.sum(-1) / m.sum(-1).clamp_min(1).to(x.dtype)                   # [B]
        return per_sample.sum() / (x.shape[0] if num_samples is None else num_samples)
    if reduction == "token_mean":
        _check_normalizer("num_tokens", num_tokens)
        denom = m.sum().clamp_min(1).to(x.dtype) if num_tokens is None else num_tokens
        return xm.sum() / denom
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def _zero_masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_ratio(new: torch.Tensor, old: torch.Tensor, m: torch.Tensor, sequence_level: bool) -> torch.Tensor:
    """[B, T] log of the importance ratio (token-level, or GSPO-token's sequence-level value), 0 where masked."""
    zero = torch.zeros((), dtype=new.dtype, device=new.device)
    token = torch.where(m, new - old, zero)                                             # [B, T]
    if sequence_level:
        seq = token.sum(-1) / m.sum(-1).clamp_min(1).to(new.dtype)                      # [B]  = -seq_kl_i
        token = torch.where(m, seq.detach()[:, None] + new - new.detach(), zero)
    return token.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float,
                       dual_clip: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss and the bool maps of tokens where the clip / the dual clip is the active branch."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (bound < loss)
        loss = torch.where(dual_active, bound, loss)
    return loss, clip_active, dual_active


def _check_policy_args(new_logprobs, old_logprobs, advantages, mask, eps_clip, eps_clip_high, dual_clip,
                       reduction, entropy, entropy_coef, ref_logprobs, ref_kl_coef, ref_kl) -> None:
    check_2d("new_logprobs", new_logprobs)
    check_same_shape("new_logprobs", new_logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                     entropy=entropy, ref_logprobs=ref_logprobs)
    check_coef("eps_clip", eps_clip)
    check_coef("eps_clip_high", eps_clip_high)
    if eps_clip >= 1:
        raise ValueError(f"eps_clip must be < 1 (the ratio is clipped to [1 - eps_clip, ...]); got {eps_clip}")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1):
        raise ValueError(f"dual_clip must be > 1 (a bound c*|A| on the loss of negative-advantage tokens) or None; "
                         f"got {dual_clip}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if check_coef("entropy_coef", entropy_coef) and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy=[B, T] (e.g. opd_kernels.token_logprobs(..., "
                         "return_entropy=True))")
    if check_coef("ref_kl_coef", ref_kl_coef) and ref_logprobs is None:
        raise ValueError(f"ref_kl_coef={ref_kl_coef} needs ref_logprobs=[B, T] from the reference model")
    if ref_kl not in REF_KL_ESTIMATORS:
        raise ValueError(f"unknown ref_kl estimator {ref_kl!r}; choose one of {', '.join(REF_KL_ESTIMATORS)}")


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_clip: float = 0.2, eps_clip_high: float | None = None,
                dual_clip: float | None = None, sequence_level_ratio: bool = False,
                reduction: str = "sample_mean", num_samples: float | torch.Tensor | None = None,
                num_tokens: float | torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                entropy_coef: float = 0.0, ref_logprobs: torch.Tensor | None = None, ref_kl_coef: float = 0.0,
                ref_kl: str = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss ``pg - entropy_coef * entropy + ref_kl_coef * KL(new || ref)`` (module docstring).

    Args:
        new_logprobs: [B, T] log-probs of the sampled tokens under the current policy (differentiable).
        old_logprobs: [B, T] the same under the behaviour policy (detached by the caller or not; unused in grad).
        advantages: [B, T] final advantages (estimator -> apply_opd -> whiten); treated as constants.
        mask: [B, T] 1 = trainable token.
        eps_clip, eps_clip_high: clip range [1 - eps_clip, 1 + eps_clip_high] (eps_clip_high defaults to eps_clip).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens at c*|A|; None = off.
        sequence_level_ratio: GSPO's length-normalised sequence ratio (GSPO-token form).
        reduction, num_samples, num_tokens: "sample_mean" | "token_mean" and the global-batch normalisers
            (module docstring; :func:`loss_normalizer`). Every term uses the same reduction.
        entropy, entropy_coef: [B, T] per-token entropy of the current policy (differentiable) and its bonus weight.
        ref_logprobs, ref_kl_coef, ref_kl: reference-model log-probs, the KL-loss weight and estimator k1|k2|k3
            (or low_var_kl: k3 clamped to [-10, 10], slime's name) of
            KL(new || ref) on the sampled tokens (k3 = exp(ref - new) - 1 + (new - ref), the usual low-variance one).

    Returns:
        (loss, metrics): a differentiable scalar, and detached scalars: ``pg_loss`` (same reduction), and local
        masked token means ``clipfrac``, ``dual_clipfrac``, ``approx_kl`` (mean of old - new: the k1 estimate of
        KL(old || new)), ``ratio_mean``, ``ratio_min``, ``ratio_max``, plus ``entropy`` / ``ref_kl`` when given.
    """
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    _check_policy_args(new_logprobs, old_logprobs, advantages, mask, eps_clip, eps_clip_high, dual_clip,
                       reduction, entropy, entropy_coef, ref_logprobs, ref_kl_coef, ref_kl)
    m = as_bool_mask(mask, "mask")
    norm = dict(num_samples=num_samples, num_tokens=num_tokens)
    # Padding may hold anything (-inf log-probs, NaN advantages): zero it first, or 0 * inf in a backward
    # through an unselected torch.where branch would still turn the gradient into NaN.
    new = _zero_masked(new_logprobs, m)
    old = _zero_masked(old_logprobs.detach().to(new.dtype), m)
    adv = _zero_masked(advantages.detach().to(new.dtype), m)
    log_ratio = _log_ratio(new, old, m, sequence_level_ratio)                           # [B, T]
    ratio = log_ratio.exp()
    pg, clip_active, dual_active = _clipped_surrogate(ratio, adv, eps_clip, eps_clip_high, dual_clip)
    pg_loss = reduce_tokens(pg, m, reduction, **norm)
    loss = pg_loss
    metrics = _ratio_metrics(ratio.detach(), log_ratio.detach(), clip_active, dual_active, m)
    metrics["pg_loss"] = pg_loss.detach()
    if entropy is not None:
        ent = reduce_tokens(_zero_masked(entropy, m), m, reduction, **norm)
        if entropy_coef:
            loss = loss - entropy_coef * ent
        metrics["entropy"] = masked_mean(entropy.detach(), m)
    if ref_logprobs is not None:
        ref = _zero_masked(ref_logprobs.detach().to(new.dtype), m)
        kl = (kl_estimate(new, ref, "k3").clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP) if ref_kl == "low_var_kl"
              else kl_estimate(new, ref, ref_kl))
        if ref_kl_coef:
            loss = loss + ref_kl_coef * reduce_tokens(kl, m, reduction, **norm)
        metrics["ref_kl"] = masked_mean(kl.detach(), m)
    metrics["loss"] = loss.detach()
    return loss, metrics


def _ratio_metrics(ratio, log_ratio, clip_active, dual_active, m) -> dict[str, torch.Tensor]:
    inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)
    return {
        "clipfrac": masked_mean(clip_active.to(ratio.dtype), m),
        "dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), m),
        "approx_kl": masked_mean(-log_ratio, m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_min": torch.where(m, ratio, inf).min() if m.numel() else inf,
        "ratio_max": torch.where(m, ratio, -inf).max() if m.numel() else -inf,
    }


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               value_clip: float | None = 0.2, reduction: str = "sample_mean",
               num_samples: float | torch.Tensor | None = None,
               num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss for PPO: ``0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)``.

    Args:
        values: [B, T] current critic values (differentiable); old_values: [B, T] values at rollout time;
        returns: [B, T] GAE returns from ``compute_advantages("ppo", ...)`` (targets, never OPD-shaped).
        value_clip: c > 0, or None for the plain ``0.5 * (V - G)^2``.
        reduction, num_samples, num_tokens: as for :func:`policy_loss`.

    Returns:
        (loss, metrics) with ``value_loss``, ``value_clipfrac`` (tokens where the clipped branch is larger),
        ``value_mean``, ``return_mean`` (local masked token means, detached).
    """
    check_2d("values", values)
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    if value_clip is not None:
        check_coef("value_clip", value_clip, allow_zero=False)
    m = as_bool_mask(mask, "mask")
    v = _zero_masked(values, m)
    target = _zero_masked(returns.detach().to(values.dtype), m)
    plain = (v - target) ** 2
    if value_clip is None:
        per_token, clip_active = 0.5 * plain, torch.zeros_like(m)
    else:
        old = _zero_masked(old_values.detach().to(values.dtype), m)
        clipped = (old + (v - old).clamp(-value_clip, value_clip) - target) ** 2
        per_token, clip_active = 0.5 * torch.maximum(plain, clipped), clipped > plain
    loss = reduce_tokens(per_token, m, reduction, num_samples=num_samples, num_tokens=num_tokens)
    metrics = {
        "value_loss": loss.detach(),
        "value_clipfrac": masked_mean(clip_active.to(values.dtype), m),
        "value_mean": masked_mean(v.detach(), m),
        "return_mean": masked_mean(target, m),
    }
    return loss, metrics
