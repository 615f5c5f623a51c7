"""A run's distributed pieces: Ray, the rollout manager (engines) and the trainer group; and a pool that keeps them.

The trainer actors and the student engines start concurrently (both spend seconds importing and loading).
Everything is torn down in reverse order on exit, also after an error, so no server or actor outlives the run.

:class:`RuntimePool` keeps a finished run's runtime warm for the next run of the same shape (the built-in
experiment runs several trainings one after the other; the tests run many short ones). Process start-up (Python
+ torch + Megatron imports, engine servers) is most of a short run's cost on CPU. The pool is an object its owner
passes to :func:`opd_train.train.run` and closes; there is no module-level state.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..config import Config
from ..observability import log_dir
from ..rollout.manager import EndpointFailed, RewardPlan, RolloutManager, plan_rewards
from ..serialization import register_fast_tensor_serializer
from ..teacher import server_url
from ..types import TeacherUnavailable
from .cluster import plan_placement, start_ray, trainer_threads
from .settings import engine_kind, trainer_settings
from .trainer_group import TrainerGroup


def _key(c: Config, device: str) -> tuple:
    """What a warm runtime must share with the next run to be reused: processes, parallelism, engine shape."""
    with open(os.path.join(c.model.hf_checkpoint, "config.json")) as f:
        arch = f.read()
    return (c.derived["world_size"], c.train.tensor_model_parallel_size, device, engine_kind(c, device),
            c.rollout.rollout_num_engines, c.rollout.rollout_num_gpus_per_engine, c.rollout.sglang_extra_args, arch,
            c.cluster.ray_address, c.cluster.trainer_threads)


def _quiet_dir(c: Config) -> str | None:
    """Where actors write their output: OUTPUT_DIR/logs, or None (the terminal) with --verbose."""
    return None if c.log.verbose else log_dir(c.log.output_dir)


def _plan(c: Config) -> RewardPlan:
    return plan_rewards(c.reward, teacher=None if c.plan is None else c.plan.teacher,
                        opd_task_rm_path=c.opd.opd_task_rm_path)


def _root_cause(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError.cause) and chained causes."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


@dataclass
class Runtime:
    rollout: object                 # Ray actor handle of RolloutManager
    trainers: TrainerGroup
    plan: RewardPlan
    started_ray: bool
    key: tuple = ()
    rm_url: str | None = None       # the SGLang teacher, whose failures stop the run resumably

    @classmethod
    def start(cls, c: Config, save_dir: str) -> "Runtime":
        import ray
        t0 = time.perf_counter()
        world = c.derived["world_size"]
        started = start_ray(c.cluster, min_cpus=world + 1, output_dir=c.log.output_dir, verbose=c.log.verbose)
        register_fast_tensor_serializer()
        t_ray = time.perf_counter()
        try:
            placement = plan_placement(c.cluster, world)
            plan = _plan(c)
            manager = ray.remote(RolloutManager).options(num_cpus=1, max_concurrency=64).remote(
                c.rollout, c.model.hf_checkpoint, c.args_with(opd_task_rm_path=plan.opd_task), plan,
                engine_kind=engine_kind(c, placement.device), vocab_size=c.derived["vocab_size"],
                log_dir=log_dir(c.log.output_dir), host="127.0.0.1" if c.cluster.ray_address is None else "node",
                quiet=not c.log.verbose)
            engines = manager.start.remote()                       # engines start while the trainers build
            try:
                threads = trainer_threads(c.cluster, placement, c.derived.get("model_params", 0))
                trainers = TrainerGroup.create(trainer_settings(c, save_dir), world_size=world, placement=placement,
                                               threads_per_rank=threads, log_dir=_quiet_dir(c))
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
            where = f"{placement.device}, {trainers.threads} torch thread(s) each"
            print(f"[opd-train] started in {time.perf_counter() - t0:.1f} s (ray {t_ray - t0:.1f} s, {world} trainer "
                  f"rank(s) on {where} {t_trainers - t_ray:.1f} s, {c.rollout.rollout_num_engines} engine(s) ready "
                  f"{time.perf_counter() - t_ray:.1f} s after ray)", flush=True)
            return cls(manager, trainers, plan, started, _key(c, placement.device), c.reward.rm_url)
        except BaseException:
            if started:
                ray.shutdown()
            raise

    def reconfigure(self, c: Config, save_dir: str) -> None:
        """Reuse the live actors and engines for another run: fresh trainer state (model, optimizer, teacher,
        checkpoint resume) from ``c``, the engines reloaded with the run's initial student weights."""
        import ray
        t0 = time.perf_counter()
        self.plan, self.rm_url = _plan(c), c.reward.rm_url
        configured = self.rollout.configure.remote(c.rollout, c.model.hf_checkpoint,
                                                   c.args_with(opd_task_rm_path=self.plan.opd_task), self.plan,
                                                   log_dir(c.log.output_dir))
        self.trainers.reset(trainer_settings(c, save_dir), log_dir=_quiet_dir(c))
        ray.get(configured)
        print(f"[opd-train] reused the warm runtime ({time.perf_counter() - t0:.1f} s)", flush=True)

    def generate(self, prompts, step: int):
        """One rollout step's samples and timings; a teacher that gave up raises :class:`TeacherUnavailable`."""
        import ray
        try:
            return ray.get(self.rollout.generate.remote(prompts, step))
        except Exception as exc:        # noqa: BLE001 - classified below, re-raised otherwise
            cause = _root_cause(exc)
            if self.rm_url and isinstance(cause, EndpointFailed) and cause.url.startswith(server_url(self.rm_url)):
                raise TeacherUnavailable(f"the teacher at {cause.url} did not answer after {cause.attempts} attempts "
                                         f"({cause}); the run stopped", url=cause.url) from exc
            raise

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


class RuntimePool:
    """Warm runtimes for consecutive runs: ``with RuntimePool() as pool: run(cfg_a, pool=pool); run(cfg_b, ...)``.

    A run that ends cleanly hands its runtime back; the next run of the same shape reuses it (fresh trainer
    state, engines reloaded), another shape first frees it. Everything is closed when the block ends.
    """

    def __init__(self, max_size: int = 1):
        self.max_size = max_size
        self._warm: OrderedDict[tuple, Runtime] = OrderedDict()

    def acquire(self, c: Config, save_dir: str) -> Runtime:
        import ray
        if ray.is_initialized() and self._warm:
            rt = self._warm.pop(_key(c, plan_placement(c.cluster, c.derived["world_size"]).device), None)
            if rt is not None:
                try:
                    rt.reconfigure(c, save_dir)
                    return rt
                except BaseException:
                    rt.close(shutdown_ray=False)
                    raise
        while self._warm:                       # another shape: free its resources (CPU/GPU slots) first
            self._warm.popitem()[1].close(shutdown_ray=False)
        return Runtime.start(c, save_dir)

    def release(self, rt: Runtime, *, healthy: bool) -> None:
        if not healthy:
            rt.close(shutdown_ray=False)
            return
        self._warm[rt.key] = rt
        while len(self._warm) > self.max_size:
            self._warm.popitem(last=False)[1].close(shutdown_ray=False)

    def close(self) -> None:
        started = any(rt.started_ray for rt in self._warm.values())
        while self._warm:
            self._warm.popitem()[1].close(shutdown_ray=False)
        if started:
            import ray
            ray.shutdown()

    def __enter__(self) -> "RuntimePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
