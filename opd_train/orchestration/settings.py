"""The run configuration as the Megatron backend's typed settings (one function per backend section)."""
from __future__ import annotations

import os

from ..backends.megatron import (BatchingSettings, CheckpointSettings, CriticSettings, LossSettings, ModelSource,
                                 OPDSettings, OptimizerSettings, ParallelSettings, PrecisionSettings,
                                 TeacherSettings, TrainerSettings)
from ..config import AlgoConfig, Config, OPDPlan


def model_source(path: str) -> ModelSource:
    """A HF directory or one of our torch_dist checkpoints."""
    if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return ModelSource(checkpoint=path)
    return ModelSource(hf_path=path)


def optimizer_settings(c: Config, lr: float, total_steps: int, *, actor: bool) -> OptimizerSettings:
    """The actor's (the name lists apply to it, as in slime) or the critic's optimizer."""
    t = c.train
    decay = None if t.lr_decay_style == "constant" else max(total_steps, t.lr_warmup_iters + 1)
    names = dict(only_train=t.only_train_params_name_list, freeze=t.freeze_params_name_list or ()) if actor else {}
    return OptimizerSettings(lr=lr, min_lr=min(t.min_lr, lr), lr_warmup_steps=t.lr_warmup_iters,
                             lr_decay_steps=decay, lr_decay_style=t.lr_decay_style, weight_decay=t.weight_decay,
                             adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad, **names)


def optimizer_steps_per_rollout(c: Config) -> int:
    total = c.rollout.rollout_batch_size * c.rollout.n_samples_per_prompt
    return total // (c.train.global_batch_size or total)


def opd_settings(plan: OPDPlan | None) -> OPDSettings | None:
    """The plan as the trainer reads it: the sampled estimator (advantage penalty) or the distribution (loss)."""
    if plan is None:
        return None
    return OPDSettings(estimator=plan.kl if plan.sampled else None, advantage_coef=plan.advantage_coef,
                       loss_coef=plan.loss_coef)


def trainer_settings(c: Config, save_dir: str) -> TrainerSettings:
    m, a, o, t = c.model, c.algo, c.opd, c.train
    total = c.rollout.num_rollout * optimizer_steps_per_rollout(c)
    need_ref = a.kl_coef > 0 or a.use_kl_loss
    ref = model_source(m.ref_load or m.hf_checkpoint) if need_ref else None
    megatron = c.plan is not None and c.plan.teacher == "megatron"
    teacher = (TeacherSettings(load=o.opd_teacher_load, step=o.opd_teacher_ckpt_step, offload=o.offload_teacher)
               if megatron else None)
    critic = (CriticSettings(source=model_source(m.critic_load or m.hf_checkpoint),
                             optimizer=optimizer_settings(c, a.critic_lr or t.lr, total, actor=False))
              if a.advantage_estimator == "ppo" else None)
    return TrainerSettings(
        model=ModelSource(hf_path=m.hf_checkpoint), parallel=ParallelSettings(t.tensor_model_parallel_size),
        optimizer=optimizer_settings(c, t.lr, total, actor=True),
        precision=PrecisionSettings("bf16" if m.bf16 else "fp32"),
        checkpoint=CheckpointSettings(load=c.checkpoint.load, save=save_dir, no_load_optim=c.checkpoint.no_load_optim),
        batching=BatchingSettings(t.max_tokens_per_gpu, t.fused_output_layer, t.fused_linear_chunk_tokens),
        reference=ref, teacher=teacher, opd=opd_settings(c.plan),
        critic=critic, temperature=c.rollout.rollout_temperature, seed=t.seed)


def loss_settings(algo: AlgoConfig) -> LossSettings:
    return LossSettings(eps_clip=algo.eps_clip, eps_clip_high=algo.eps_clip_high, dual_clip=algo.eps_clip_c,
                        sequence_level_ratio=algo.advantage_estimator == "gspo",
                        reduction="token_mean" if algo.calculate_per_token_loss else "sample_mean",
                        entropy_coef=algo.entropy_coef, ref_kl_coef=algo.kl_loss_coef if algo.use_kl_loss else 0.0,
                        ref_kl=algo.kl_loss_type, value_clip=algo.value_clip)


def engine_kind(c: Config, device: str) -> str:
    kind = c.rollout.rollout_engine
    return ("sglang" if device == "cuda" else "cpu") if kind == "auto" else kind
