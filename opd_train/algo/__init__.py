"""The algorithm layer of opd: advantage estimators, OPD shaping, whitening, losses.

Pure PyTorch plus ``opd_kernels`` (no Megatron, no Ray), usable with any trainer. One training step reads:

    adv, ret = compute_advantages(estimator, rewards=R, response_mask=m, group_size=n, ...)   # [B, T]
    adv, kl  = apply_opd(adv, old_logprobs, teacher_logprobs, coef=opd_kl_coef, response_mask=m)
    adv      = whiten(adv, m, process_group=dp_group)          # if --normalize-advantages or WHITENING_REQUIRED
    loss, metrics = policy_loss(new_logprobs, old_logprobs, adv, m, num_samples=loss_normalizer(...))

The math of each step is in the docstring of its module (SPEC §1).
"""
from .advantages import ESTIMATORS, WHITENING_REQUIRED, compute_advantages, discounted_gae, group_mean_std
from .loss import REDUCTIONS, loss_normalizer, policy_loss, reduce_tokens, value_loss
from .opd import KL_ESTIMATORS, apply_opd, apply_opd_kl, kl_estimate
from .whiten import masked_mean, masked_moments, whiten

__all__ = [
    "ESTIMATORS", "KL_ESTIMATORS", "REDUCTIONS", "WHITENING_REQUIRED",
    "apply_opd", "apply_opd_kl", "compute_advantages", "discounted_gae", "group_mean_std", "kl_estimate",
    "loss_normalizer", "masked_mean", "masked_moments", "policy_loss", "reduce_tokens", "value_loss", "whiten",
]
