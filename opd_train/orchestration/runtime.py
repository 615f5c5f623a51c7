"""Starting and stopping a run's distributed pieces: Ray, the rollout manager (engines) and the trainer group.

The trainer actors and the student engines start concurrently (both spend seconds importing and loading).
Everything is torn down in reverse order on exit, also after an error, so no server or actor outlives the run.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from ..backends.megatron import (BatchingSettings, CheckpointSettings, CriticSettings, ModelSource, OptimizerSettings,
                                 ParallelSettings, PrecisionSettings, TeacherSettings, TrainerSettings)
from ..config import Config
from ..rollout.manager import RewardPlan, RolloutManager, plan_rewards
from .cluster import plan_placement, start_ray
from .serialization import register_fast_tensor_serializer
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


def _key(c: Config, device: str) -> tuple:
    """What a warm runtime must share with the next run to be reused: processes, parallelism, engine shape."""
    with open(os.path.join(c.model.hf_checkpoint, "config.json")) as f:
        arch = f.read()
    return (c.derived["world_size"], c.train.tensor_model_parallel_size, device, engine_kind(c, device),
            c.rollout.rollout_num_engines, c.rollout.rollout_num_gpus_per_engine, c.rollout.sglang_extra_args, arch,
            c.cluster.ray_address)


@dataclass
class Runtime:
    rollout: object                 # Ray actor handle of RolloutManager
    trainers: TrainerGroup
    plan: RewardPlan
    started_ray: bool
    key: tuple = ()

    @classmethod
    def start(cls, c: Config, save_dir: str, *, engine_threads: int | None = None) -> "Runtime":
        import ray
        t0 = time.perf_counter()
        world = c.derived["world_size"]
        started = start_ray(c.cluster, min_cpus=world + 1)
        register_fast_tensor_serializer()
        t_ray = time.perf_counter()
        try:
            placement = plan_placement(c.cluster, world)
            plan = _plan(c)
            manager = ray.remote(RolloutManager).options(num_cpus=1, max_concurrency=64).remote(
                c.rollout, c.model.hf_checkpoint, c.args_with(opd_task_rm_path=plan.opd_task), plan,
                engine_kind=engine_kind(c, placement.device), vocab_size=c.derived["vocab_size"],
                log_dir=c.log.output_dir, engine_threads=engine_threads,
                host="127.0.0.1" if c.cluster.ray_address is None else "node")
            engines = manager.start.remote()                       # engines start while the trainers build
            try:
                trainers = TrainerGroup.create(trainer_settings(c, save_dir), world_size=world, placement=placement)
            except BaseException:
                ray.kill(manager)
                raise
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
            return cls(manager, trainers, plan, started, _key(c, placement.device))
        except BaseException:
            if started:
                ray.shutdown()
            raise

    def reconfigure(self, c: Config, save_dir: str) -> None:
        """Reuse the live actors and engines for another run: fresh trainer state (model, optimizer, teacher,
        checkpoint resume) from ``c``, the engines reloaded with the run's initial student weights."""
        import ray
        t0 = time.perf_counter()
        self.plan = _plan(c)
        configured = self.rollout.configure.remote(c.rollout, c.model.hf_checkpoint,
                                                   c.args_with(opd_task_rm_path=self.plan.opd_task), self.plan)
        self.trainers.reset(trainer_settings(c, save_dir))
        ray.get(configured)
        print(f"[opd-train] reused the warm runtime ({time.perf_counter() - t0:.1f} s)", flush=True)

    def close(self, *, shutdown_ray: bool = True) -> None:
        import ray
        try:
            ray.get(self.rollout.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the actor is killed below anyway; its servers have atexit hooks
            pass
        ray.kill(self.rollout)
        self.trainers.shutdown()
        if self.started_ray and shutdown_ray:
            ray.shutdown()


def _plan(c: Config) -> RewardPlan:
    return plan_rewards(c.reward, use_opd=c.opd.use_opd, opd_type=c.opd.opd_type,
                        opd_task_rm_path=c.opd.opd_task_rm_path)


# Warm runtimes: inside ``warm_runtimes()``, a finished run's actors and engines are kept and reused by the next
# run with the same shape (the built-in experiment runs OPD then GRPO; the tests run many short runs). Process
# start-up (Python + torch + Megatron imports, engine servers) is most of a short run's cost on CPU.
_POOL: "OrderedDict[tuple, Runtime] | None" = None


@contextmanager
def warm_runtimes():
    """Keep finished runs' runtimes warm for the next runs of this block; close them all at the end."""
    global _POOL
    if _POOL is not None:                       # nested: the outer context owns the pool
        yield
        return
    _POOL = OrderedDict()
    try:
        yield
    finally:
        pool, _POOL = _POOL, None
        started = any(rt.started_ray for rt in pool.values())
        for rt in pool.values():
            rt.close(shutdown_ray=False)
        if started:
            import ray
            ray.shutdown()


def acquire(c: Config, save_dir: str) -> Runtime:
    """A runtime for this run: a warm one of the same shape when available, else a new one."""
    if _POOL is not None:
        import ray
        if ray.is_initialized():
            device = plan_placement(c.cluster, c.derived["world_size"]).device
            rt = _POOL.pop(_key(c, device), None)
            if rt is not None:
                try:
                    rt.reconfigure(c, save_dir)
                    return rt
                except BaseException:
                    rt.close(shutdown_ray=False)
                    raise
        while _POOL:                            # another shape: free its resources (CPU/GPU slots) first
            _POOL.popitem()[1].close(shutdown_ray=False)
    return Runtime.start(c, save_dir)


def release(rt: Runtime, *, healthy: bool, max_size: int = 1) -> None:
    """Keep ``rt`` warm (inside ``warm_runtimes()``, after a run that ended cleanly) or close it."""
    if _POOL is None or not healthy:
        rt.close(shutdown_ray=_POOL is None)
        return
    _POOL[rt.key] = rt
    while len(_POOL) > max_size:
        _, old = _POOL.popitem(last=False)
        old.close(shutdown_ray=False)
