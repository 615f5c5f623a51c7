"""The algorithm part of one training step, on the driver: samples + trainer scores -> advantages and metrics.

Reads as SPEC section 1: base estimator (``compute_advantages``) -> OPD (``apply_opd``: A' = A - coef * kl_t,
sampled mode) -> whitening over the global batch (which equals the all-reduced whitening over DP ranks: the
driver holds the whole batch). In ``--opd-kl-mode full`` the advantages carry no OPD term: the exact KL enters
the trainer's loss instead (see :mod:`.opd_trainer` for why).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algo import WHITENING_REQUIRED, apply_opd, compute_advantages, masked_mean, topk_to_dense_logprobs, whiten
from ..backends.megatron import LossSettings, TrainBatch
from ..config import AlgoConfig, OPDConfig
from ..rollout.sample import Sample, Status


def pad(rows: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Right-pad per-sample [R_i] tensors to [B, width] (zeros)."""
    width = width or max(r.numel() for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r.reshape(-1).float()
    return out


def unpad(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [x[i, :n].clone() for i, n in enumerate(lengths)]


def to_train_batch(samples: list[Sample]) -> TrainBatch:
    aborted = [s.index for s in samples if s.status == Status.ABORTED]
    if aborted:
        raise RuntimeError(f"the rollout engine aborted samples {aborted[:8]}; see the engine logs in the output dir")
    return TrainBatch.from_samples(samples)


@dataclass
class Advantages:
    advantages: list[torch.Tensor]          # per sample [R_i], final (OPD-shaped, whitened)
    returns: list[torch.Tensor] | None      # critic targets (ppo)
    metrics: dict[str, float]


def loss_settings(algo: AlgoConfig) -> LossSettings:
    return LossSettings(eps_clip=algo.eps_clip, eps_clip_high=algo.eps_clip_high, dual_clip=algo.eps_clip_c,
                        sequence_level_ratio=algo.advantage_estimator == "gspo",
                        reduction="token_mean" if algo.calculate_per_token_loss else "sample_mean",
                        entropy_coef=algo.entropy_coef, ref_kl_coef=algo.kl_loss_coef if algo.use_kl_loss else 0.0,
                        ref_kl=algo.kl_loss_type, value_clip=algo.value_clip)


def teacher_logprobs(samples: list[Sample], scored_teacher: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Teacher log-probs of the sampled tokens: from the Megatron forward, else from the SGLang hook."""
    if scored_teacher is not None:
        return scored_teacher
    missing = [s.index for s in samples if s.teacher_log_probs is None]
    if missing:
        raise RuntimeError(f"samples {missing[:8]} have no teacher log-probs: in sglang mode the reward function "
                           "must be opd_train.rollout.on_policy_distillation.reward_func")
    return [s.teacher_log_probs for s in samples]


def teacher_rows(samples: list[Sample], vocab_size: int) -> list[torch.Tensor]:
    """Dense [R_i, V] teacher log-probs from the SGLang teacher's full distribution (``--opd-kl-mode full``)."""
    rows = []
    for s in samples:
        if s.teacher_topk_ids is None or s.teacher_topk_ids.shape[-1] != vocab_size:
            raise RuntimeError(f"sample {s.index}: --opd-kl-mode full needs the teacher's full distribution "
                               f"({vocab_size} log-probs per token) but got "
                               f"{None if s.teacher_topk_ids is None else s.teacher_topk_ids.shape[-1]}")
        rows.append(topk_to_dense_logprobs(s.teacher_topk_ids, s.teacher_topk_log_probs, vocab_size))
    return rows


def compute_step_advantages(algo: AlgoConfig, opd: OPDConfig, *, samples: list[Sample], group_size: int,
                            old_logprobs: list[torch.Tensor], teacher_lp: list[torch.Tensor] | None,
                            ref_logprobs: list[torch.Tensor] | None, values: list[torch.Tensor] | None) -> Advantages:
    lengths = [s.response_length for s in samples]
    mask = pad([torch.tensor(s.get_loss_mask(), dtype=torch.float32) for s in samples])           # [B, T]
    rewards = torch.tensor([s.metadata["train_reward"] for s in samples], dtype=torch.float32)     # [B]
    old = pad(old_logprobs, mask.shape[1])
    ref_kl = None if ref_logprobs is None else (old - pad(ref_logprobs, mask.shape[1])) * mask
    adv, ret = compute_advantages(
        algo.advantage_estimator, rewards=rewards, response_mask=mask, group_size=group_size,
        values=None if values is None else pad(values, mask.shape[1]), ref_kl=ref_kl, gamma=algo.gamma,
        lam=algo.lambd, kl_coef=algo.kl_coef, std_normalize=not algo.disable_grpo_std_normalization,
        rewards_normalize=not algo.disable_rewards_normalization)
    metrics = {"rollout/reward": rewards.mean().item()}
    if opd.use_opd:
        tea = pad(teacher_lp, mask.shape[1])
        if opd.opd_kl_mode == "sampled":
            adv, _ = apply_opd(adv, old, tea, coef=opd.opd_kl_coef, kl=opd.opd_kl_estimator or "k1",
                               response_mask=mask)
        # k1 = lp_S - lp_T of the sampled tokens: an unbiased estimate of the reverse KL in every mode.
        metrics["opd/reverse_kl"] = masked_mean(old - tea, mask).item()
        metrics["opd/teacher_logprob_mean"] = masked_mean(tea, mask).item()
    if algo.normalize_advantages or algo.advantage_estimator in WHITENING_REQUIRED:
        adv = whiten(adv, mask)
    metrics["train/advantage_abs_mean"] = masked_mean(adv.abs(), mask).item()
    return Advantages(unpad(adv, lengths), None if values is None else unpad(ret, lengths), metrics)


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    n = len(samples)
    out = {"rollout/response_len": sum(s.response_length for s in samples) / n,
           "rollout/truncated": sum(s.status == Status.TRUNCATED for s in samples) / n}
    metric = [s.metadata["metric"] for s in samples if "metric" in s.metadata]
    if metric:
        out["rollout/accuracy"] = sum(metric) / len(metric)
    return out
