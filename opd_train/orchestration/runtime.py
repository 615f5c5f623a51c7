"""Starting and stopping a run's distributed pieces: Ray, the rollout manager (engines) and the trainer group.

The trainer actors and the student engines start concurrently (both spend seconds importing and loading).
Everything is torn down in reverse order on exit, also after an error, so no server or actor outlives the run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..backends.megatron import (BatchingSettings, CheckpointSettings, CriticSettings, ModelSource, OptimizerSettings,
                                 ParallelSettings, PrecisionSettings, TeacherSettings, TrainerSettings)
from ..config import Config
from ..rollout.manager import RewardPlan, RolloutManager, plan_rewards
from .cluster import plan_placement, start_ray
from .trainer_group import TrainerGroup


def _source(path: str) -> ModelSource:
    """A HF directory or one of our torch_dist checkpoints."""
    if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return ModelSource(checkpoint=path)
    return ModelSource(hf_path=path)


def optimizer_settings(c: Config, lr: float, total_steps: int) -> OptimizerSettings:
    t = c.train
    decay = None if t.lr_decay_style == "constant" else max(total_steps, t.lr_warmup_iters + 1)
    return OptimizerSettings(lr=lr, min_lr=min(t.min_lr, lr), lr_warmup_steps=t.lr_warmup_iters,
                             lr_decay_steps=decay, lr_decay_style=t.lr_decay_style, weight_decay=t.weight_decay,
                             adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad)


def optimizer_steps_per_rollout(c: Config) -> int:
    total = c.rollout.rollout_batch_size * c.rollout.n_samples_per_prompt
    return total // (c.train.global_batch_size or total)


def trainer_settings(c: Config, save_dir: str) -> TrainerSettings:
    m, a, o, t = c.model, c.algo, c.opd, c.train
    total = c.rollout.num_rollout * optimizer_steps_per_rollout(c)
    need_ref = a.kl_coef > 0 or a.use_kl_loss
    ref = _source(m.ref_load or m.hf_checkpoint) if need_ref else None
    teacher = (TeacherSettings(load=o.opd_teacher_load, step=o.opd_teacher_ckpt_step, offload=o.offload_teacher)
               if o.use_opd and o.opd_type == "megatron" else None)
    critic = (CriticSettings(source=_source(m.critic_load or m.hf_checkpoint),
                             optimizer=optimizer_settings(c, a.critic_lr or t.lr, total))
              if a.advantage_estimator == "ppo" else None)
    return TrainerSettings(
        model=ModelSource(hf_path=m.hf_checkpoint), parallel=ParallelSettings(t.tensor_model_parallel_size),
        optimizer=optimizer_settings(c, t.lr, total), precision=PrecisionSettings("bf16" if m.bf16 else "fp32"),
        checkpoint=CheckpointSettings(load=c.checkpoint.load, save=save_dir, no_load_optim=c.checkpoint.no_load_optim),
        batching=BatchingSettings(t.max_tokens_per_gpu), reference=ref, teacher=teacher, critic=critic,
        temperature=c.rollout.rollout_temperature, seed=t.seed)


def engine_kind(c: Config, device: str) -> str:
    kind = c.rollout.rollout_engine
    return ("sglang" if device == "cuda" else "cpu") if kind == "auto" else kind


@dataclass
class Runtime:
    rollout: object                 # Ray actor handle of RolloutManager
    trainers: TrainerGroup
    plan: RewardPlan
    started_ray: bool

    @classmethod
    def start(cls, c: Config, save_dir: str, *, engine_threads: int | None = None) -> "Runtime":
        import ray
        t0 = time.perf_counter()
        world = c.derived["world_size"]
        started = start_ray(c.cluster, min_cpus=world + 1)
        t_ray = time.perf_counter()
        try:
            placement = plan_placement(c.cluster, world)
            plan = plan_rewards(c.reward, use_opd=c.opd.use_opd, opd_type=c.opd.opd_type,
                                opd_task_rm_path=c.opd.opd_task_rm_path)
            args = c.args_with(opd_task_rm_path=plan.opd_task)
            manager = ray.remote(RolloutManager).options(num_cpus=1, max_concurrency=64).remote(
                c.rollout, c.model.hf_checkpoint, args, plan, engine_kind=engine_kind(c, placement.device),
                vocab_size=c.derived["vocab_size"], log_dir=c.log.output_dir, engine_threads=engine_threads)
            engines = manager.start.remote()                       # engines start while the trainers build
            trainers = TrainerGroup.create(trainer_settings(c, save_dir), world_size=world, placement=placement)
            t_trainers = time.perf_counter()
            try:
                ray.get(engines)
            except BaseException:
                trainers.shutdown()
                ray.kill(manager)
                raise
            print(f"[opd-train] started in {time.perf_counter() - t0:.1f} s (ray {t_ray - t0:.1f} s, {world} trainer "
                  f"rank(s) on {placement.device} {t_trainers - t_ray:.1f} s, {c.rollout.rollout_num_engines} "
                  f"engine(s) ready {time.perf_counter() - t_ray:.1f} s after ray)", flush=True)
            return cls(manager, trainers, plan, started)
        except BaseException:
            if started:
                ray.shutdown()
            raise

    def close(self) -> None:
        import ray
        try:
            ray.get(self.rollout.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the actor is killed below anyway; its servers have atexit hooks
            pass
        ray.kill(self.rollout)
        self.trainers.shutdown()
        if self.started_ray:
            ray.shutdown()
