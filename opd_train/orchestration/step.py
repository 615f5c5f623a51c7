"""The algorithm part of one rollout step, on the driver: samples -> base advantages -> (trainer) -> final advantages.

Order (SPEC section 1): the base estimator's advantages are computed first, from rewards only (GRPO, GSPO,
REINFORCE++-baseline), or after a forward pass for what they need (PPO: the critic's values; a reference-KL reward
penalty, ``--kl-coef``: the old and reference log-probs). The trainer's OPD forward then applies the teacher
(``A' = A - coef * KL_t``, one fused kernel per micro-batch) and whitening runs over the global batch, which the
driver holds whole (equal to the all-reduced whitening over DP ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algo import WHITENING_REQUIRED, compute_advantages, masked_mean, whiten
from ..backends.megatron import ForwardResult, TeacherRows, TrainBatch
from ..config import AlgoConfig, OPDPlan
from ..types import Sample, Status


def pad(rows: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Right-pad per-sample [R_i] tensors to [B, width] (zeros)."""
    width = width or max(r.numel() for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r.reshape(-1).float()
    return out


def unpad(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [x[i, :n].clone() for i, n in enumerate(lengths)]


def train_batch(samples: list[Sample]) -> TrainBatch:
    aborted = [s.index for s in samples if s.status == Status.ABORTED]
    if aborted:
        raise RuntimeError(f"the rollout engine aborted samples {aborted[:8]}; see the engine logs in the output dir")
    return TrainBatch.from_samples(samples)


def pre_forward(algo: AlgoConfig) -> dict | None:
    """What the base estimator needs from a forward pass before it runs (None: rewards suffice)."""
    ref_kl = algo.kl_coef > 0
    if algo.advantage_estimator != "ppo" and not ref_kl:
        return None
    return dict(actor=ref_kl, ref=ref_kl, values=algo.advantage_estimator == "ppo")


@dataclass
class BaseAdvantages:
    advantages: list[torch.Tensor]          # per sample [R_i], before OPD and whitening
    returns: list[torch.Tensor] | None      # critic targets (ppo)
    mask: torch.Tensor                      # [B, T] loss mask
    metrics: dict[str, float]


def base_advantages(algo: AlgoConfig, samples: list[Sample], group_size: int,
                    pre: ForwardResult | None) -> BaseAdvantages:
    lengths = [s.response_length for s in samples]
    mask = pad([torch.tensor(s.get_loss_mask(), dtype=torch.float32) for s in samples])           # [B, T]
    rewards = torch.tensor([s.metadata["train_reward"] for s in samples], dtype=torch.float32)     # [B]
    pad_ = (lambda rows: None if rows is None else pad(rows, mask.shape[1]))
    ref_kl = None
    if pre is not None and pre.ref_logprobs is not None:
        ref_kl = (pad_(pre.logprobs) - pad_(pre.ref_logprobs)) * mask
    values = None if pre is None else pad_(pre.values)
    adv, ret = compute_advantages(
        algo.advantage_estimator, rewards=rewards, response_mask=mask, group_size=group_size, values=values,
        ref_kl=ref_kl, gamma=algo.gamma, lam=algo.lambd, kl_coef=algo.kl_coef,
        std_normalize=not algo.disable_grpo_std_normalization,
        rewards_normalize=not algo.disable_rewards_normalization)
    return BaseAdvantages(unpad(adv, lengths), None if values is None else unpad(ret, lengths), mask,
                          {"rollout/reward": rewards.mean().item()})


def teacher_rows(plan: OPDPlan | None, samples: list[Sample]) -> TeacherRows | None:
    """An SGLang teacher's scores of the batch, as the trainer reads them (None: no teacher or the Megatron one)."""
    if plan is None or plan.teacher != "sglang":
        return None
    missing = [s.index for s in samples if s.teacher_logprobs is None]
    if missing:
        raise RuntimeError(f"samples {missing[:8]} have no teacher log-probs: in sglang mode the reward function "
                           "must be opd_train.rollout.on_policy_distillation.reward_func")
    rows = TeacherRows(logprobs=[s.teacher_logprobs for s in samples])
    if not plan.sampled:
        rows.topk_ids = [s.teacher_topk_ids for s in samples]
        rows.topk_logprobs = [s.teacher_topk_logprobs for s in samples]
    return rows


def final_advantages(algo: AlgoConfig, base: BaseAdvantages, scored: ForwardResult) -> tuple[list[torch.Tensor], dict]:
    """The OPD-shaped advantages (the trainer's, or the base ones without OPD), whitened when asked; metrics."""
    mask = base.mask
    adv = pad(scored.advantages if scored.advantages is not None else base.advantages, mask.shape[1])
    metrics = dict(base.metrics)
    if scored.opd_kl is not None:
        old, teacher = pad(scored.logprobs, mask.shape[1]), pad(scored.teacher_logprobs, mask.shape[1])
        # k1 = lp_S - lp_T of the sampled tokens: an unbiased estimate of the reverse KL, comparable across modes
        metrics["opd/reverse_kl"] = masked_mean(old - teacher, mask).item()
        metrics["opd/kl_term"] = masked_mean(pad(scored.opd_kl, mask.shape[1]), mask).item()
        metrics["opd/teacher_logprob_mean"] = masked_mean(teacher, mask).item()
    if algo.normalize_advantages or algo.advantage_estimator in WHITENING_REQUIRED:
        adv = whiten(adv, mask)
    metrics["train/advantage_abs_mean"] = masked_mean(adv.abs(), mask).item()
    return unpad(adv, [r.numel() for r in base.advantages]), metrics


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    n = len(samples)
    out = {"rollout/response_len": sum(s.response_length for s in samples) / n,
           "rollout/truncated": sum(s.status == Status.TRUNCATED for s in samples) / n}
    metric = [s.metadata["metric"] for s in samples if "metric" in s.metadata]
    if metric:
        out["rollout/accuracy"] = sum(metric) / len(metric)
    return out
