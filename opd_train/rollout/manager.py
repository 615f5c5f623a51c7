"""The rollout manager: a Ray actor that owns the student engines and turns prompts into scored samples.

One rollout step: every prompt group is sent to an engine (round robin over ``--rollout-num-engines``) as its own
request, so the engine's scheduler batches them; as soon as a group's ``n`` samples come back, the reward
function runs on each (in SGLang-mode OPD that is the teacher request, so teacher scoring overlaps the rest of the
generation), then the post-process hook turns rewards into the base-estimator rewards.

Rewards: SGLang-mode OPD uses ``opd_train.rollout.on_policy_distillation`` (the teacher's log-probs land on the
sample; the task reward, if any, is passed to it as ``opd_task_rm_path``); otherwise ``--custom-rm-path`` or the
built-in ``--rm-type``, or 0 for pure distillation with a Megatron teacher. The eval reward (``--eval-rm-type``,
default ``--rm-type``) is also computed on every rollout sample for logging (``rollout/accuracy``).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..config import OPD_POST_PROCESS, OPD_REWARD_FUNC, RewardConfig, RolloutConfig
from ..http import RequestFailed
from ..types import Sample, Status
from .data import Prompt
from .engines import SamplingParams
from .rewards import call_reward, dotted_name, get_reward_function, load_function


@dataclass(frozen=True)
class RewardPlan:
    """Which functions score a sample (dotted paths, resolved inside the actor)."""
    reward: str | None              # per-sample reward function (None: reward 0)
    post_process: str | None        # (args, samples) -> (raw, rewards), or None: raw rewards
    metric: str | None              # eval / logging reward (pass@1), or None
    opd_task: str | None = None     # the task reward handed to the OPD reward hook (sglang mode)


def plan_rewards(reward: RewardConfig, *, teacher: str | None, opd_task_rm_path: str | None) -> RewardPlan:
    """``teacher``: the OPD plan's teacher ("sglang" | "megatron"), None without OPD."""
    builtin = dotted_name(get_reward_function(reward.rm_type)) if reward.rm_type else None
    metric = reward.eval_rm_type or reward.rm_type
    metric = dotted_name(get_reward_function(metric)) if metric else (reward.custom_rm_path if teacher is None
                                                                     else None)
    if teacher == "sglang":
        return RewardPlan(reward=reward.custom_rm_path or OPD_REWARD_FUNC,
                          post_process=reward.custom_reward_post_process_path or OPD_POST_PROCESS,
                          metric=metric, opd_task=opd_task_rm_path or builtin)
    return RewardPlan(reward=reward.custom_rm_path or builtin, post_process=reward.custom_reward_post_process_path,
                      metric=metric)


class EndpointFailed(RuntimeError):
    """An HTTP endpoint (engine or teacher) gave up after its retries: ``(message, url, attempts)``."""

    def __init__(self, message: str, url: str, attempts: int):
        super().__init__(message, url, attempts)
        self.url, self.attempts = url, attempts

    def __str__(self) -> str:
        return self.args[0]


def _status(finish_reason: str) -> Status:
    return {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(finish_reason, Status.ABORTED)


class EngineServer:
    """Ray actor owning one engine server process (placed with the engine's GPUs; see RolloutManager.start)."""

    def __init__(self, log_path: str | None = None):
        from ..observability import redirect_output
        redirect_output(log_path)

    def launch(self, kind: str, hf_dir: str, cfg: RolloutConfig, host: str, threads: int | None,
               log: str | None) -> str:
        from .engines import launch_cpu_engine, launch_sglang_server
        if host == "node":          # multi-node: reachable from the manager's node (the engines have no auth:
            import ray              # keep clusters on a private network)
            host = ray.util.get_node_ip_address()
        if kind == "sglang":
            extra = tuple(["--tp", str(cfg.rollout_num_gpus_per_engine), "--skip-tokenizer-init"]
                          + (cfg.sglang_extra_args or "").split())
            self.server = launch_sglang_server(hf_dir, host=host, extra_args=extra, log_path=log)
        else:
            self.server = launch_cpu_engine(hf_dir, host=host, num_threads=threads, log_path=log)
        return self.server.url

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()


class RolloutManager:
    """Ray async actor (``ray.remote(RolloutManager)``); every method runs on the actor's event loop."""

    def __init__(self, rollout: RolloutConfig, hf_dir: str, args: Any, plan: RewardPlan, *, engine_kind: str,
                 vocab_size: int, log_dir: str | None = None, engine_threads: int | None = None,
                 host: str = "127.0.0.1", quiet: bool = False):
        """``log_dir``: engine server logs (``engine<i>.log``); with ``quiet`` also this actor's and the engine
        actors' own output (``rollout.log``), which otherwise reaches the terminal."""
        from ..serialization import register_fast_tensor_serializer
        register_fast_tensor_serializer()
        self.quiet = quiet
        self._redirect(log_dir)
        self.cfg, self.hf_dir, self.plan = rollout, hf_dir, plan
        self.args = args
        self.engine_kind, self.vocab_size = engine_kind, vocab_size
        self.log_dir, self.engine_threads = log_dir, engine_threads
        self.engines: list = []
        self.servers: list = []
        self.host = host
        from .data import load_tokenizer
        self.tokenizer = load_tokenizer(hf_dir)
        self._fns: dict[str, Callable] = {}

    def _redirect(self, log_dir: str | None) -> None:
        """This actor's output (and, at start, the engine actors') to ``LOG_DIR/rollout.log`` when quiet."""
        import os

        from ..observability import redirect_output
        self.output_log = os.path.join(log_dir, "rollout.log") if self.quiet and log_dir else None
        redirect_output(self.output_log)

    def _fn(self, path: str | None) -> Callable | None:
        if path is None:
            return None
        if path not in self._fns:
            self._fns[path] = load_function(path)
        return self._fns[path]

    # ---- engines -----------------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Launch the student engines and wait until they are healthy; returns their URLs.

        Each server is started by its own :class:`EngineServer` actor holding ``--rollout-num-gpus-per-engine``
        GPUs on GPU clusters (Ray sets the actor's CUDA_VISIBLE_DEVICES, which the server process inherits, so
        engines never share a GPU with each other or with trainer ranks); on CPU the actors hold no resources.
        """
        import os

        import ray

        from .engines import SGLangEngine
        gpus = self.cfg.rollout_num_gpus_per_engine if self.engine_kind == "sglang" else 0
        remote = ray.remote(EngineServer).options(num_cpus=0, num_gpus=gpus)
        self.servers = [remote.remote(self.output_log) for _ in range(self.cfg.rollout_num_engines)]
        urls = await asyncio.gather(*(
            server.launch.remote(self.engine_kind, self.hf_dir, self.cfg, self.host, self.engine_threads,
                                 os.path.join(self.log_dir, f"engine{i}.log") if self.log_dir else None)
            for i, server in enumerate(self.servers)))
        self.engines = [SGLangEngine(url, vocab_size=self.vocab_size) for url in urls]
        return list(urls)

    async def configure(self, rollout: RolloutConfig, hf_dir: str, args: Any, plan: RewardPlan,
                        log_dir: str | None = None) -> None:
        """Serve another run with the same engines: its settings, reward functions and initial weights (the engine
        servers keep writing to the first run's logs)."""
        self._redirect(log_dir)
        if hf_dir != self.hf_dir:
            from .data import load_tokenizer
            self.tokenizer = load_tokenizer(hf_dir)
        self.cfg, self.args, self.plan, self.hf_dir = rollout, args, plan, hf_dir
        self._fns = {}
        await self.update_weights(hf_dir, "initial")

    async def update_weights(self, hf_dir: str, version: str) -> float:
        """Every engine loads the trainer's exported HF directory; returns the seconds it took."""
        start = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(e.update_weights_from_disk, hf_dir, version) for e in self.engines))
        return time.perf_counter() - start

    async def shutdown(self) -> None:
        import ray
        for e in self.engines:
            await asyncio.to_thread(e.shutdown)
        self.engines = []
        await asyncio.gather(*(server.stop.remote() for server in self.servers), return_exceptions=True)
        for server in self.servers:
            ray.kill(server)
        self.servers = []
        from .on_policy_distillation import close_teachers
        close_teachers()

    # ---- rollout -----------------------------------------------------------------------------------------
    def _params(self, *, max_new_tokens: int, temperature: float, seed: int | None) -> SamplingParams:
        stops = tuple(int(x) for x in (self.cfg.rollout_stop_token_ids or "").split(",") if x.strip())
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            stops = tuple(sorted(set(stops) | {int(eos)}))
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=self.cfg.rollout_top_p if temperature > 0 else 1.0,
                              top_k=self.cfg.rollout_top_k if temperature > 0 else -1,
                              stop_token_ids=stops, seed=seed)

    def _samples(self, prompt: Prompt, group: int, n: int, generations) -> list[Sample]:
        out = []
        for j, g in enumerate(generations):
            out.append(Sample(index=group * n + j, group_index=group, prompt=prompt.text, label=prompt.label,
                              tokens=list(prompt.ids) + list(g.output_ids),
                              response=self.tokenizer.decode(g.output_ids, skip_special_tokens=True),
                              response_length=len(g.output_ids), rollout_logprobs=list(g.output_logprobs),
                              status=_status(g.finish_reason), metadata={"weight_version": g.weight_version}))
        return out

    async def _group(self, engine, prompt: Prompt, group: int, n: int, params: SamplingParams,
                     reward: Callable | None, metric: Callable | None) -> list[Sample]:
        generations = (await engine.agenerate([list(prompt.ids)], params, n))[0]
        samples = self._samples(prompt, group, n, generations)

        async def score(s: Sample) -> None:
            if s.status == Status.ABORTED:
                return
            if reward is not None:
                s.reward = await call_reward(reward, self.args, s)
            if metric is not None:
                s.metadata["metric"] = float(await call_reward(metric, self.args, s))

        await asyncio.gather(*(score(s) for s in samples))
        return samples

    async def generate(self, prompts: list[Prompt], step: int) -> tuple[list[Sample], dict[str, float]]:
        """Samples of one rollout step (groups adjacent, in prompt order) with rewards, and timing metrics."""
        start = time.perf_counter()
        base_seed = (self.cfg.rollout_seed * 1_000_003 + step) * 100_003
        params = self._params(max_new_tokens=self.cfg.rollout_max_response_len,
                              temperature=self.cfg.rollout_temperature, seed=base_seed)
        reward, metric = self._fn(self.plan.reward), self._fn(self.plan.metric)
        try:
            return await self._generate(prompts, step, params, reward, metric, start)
        except RequestFailed as exc:
            # Re-raised as a plain picklable error so that the driver receives it through Ray intact.
            raise EndpointFailed(str(exc), exc.url, exc.attempts) from None

    async def _generate(self, prompts, step, params, reward, metric, start):
        n = self.cfg.n_samples_per_prompt
        # One seed per group (the engine derives one per sample from it): reproducible whatever the batching,
        # and different groups never share a random stream.
        groups = await asyncio.gather(*(
            self._group(self.engines[g % len(self.engines)], p, g, n, replace(params, seed=params.seed + g), reward,
                        metric)
            for g, p in enumerate(prompts)))
        samples = [s for grp in groups for s in grp]
        generated = time.perf_counter()
        post = self._fn(self.plan.post_process)
        if post is not None:
            _, rewards = post(self.args, samples)
        else:
            rewards = [0.0 if s.reward is None or s.status == Status.ABORTED else s.get_reward_value(
                getattr(self.args, "reward_key", None)) for s in samples]
        for s, r in zip(samples, rewards):
            s.metadata["train_reward"] = float(r)
        return samples, {"time/generate": generated - start, "time/post_process": time.perf_counter() - generated}

    async def evaluate(self, prompts: list[Prompt], *, n: int, max_new_tokens: int, temperature: float) -> dict:
        """pass@1 (mean metric reward over ``n`` samples per prompt) with the current weights."""
        metric = self._fn(self.plan.metric)
        if metric is None:
            raise ValueError("evaluation needs a reward: set --eval-rm-type (or --rm-type)")
        params = self._params(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
        groups = await asyncio.gather(*(
            self._group(self.engines[g % len(self.engines)], p, g, n, params, None, metric)
            for g, p in enumerate(prompts)))
        scores = [s.metadata.get("metric", 0.0) for grp in groups for s in grp]
        lengths = [s.response_length for grp in groups for s in grp]
        return {"eval/pass@1": sum(scores) / len(scores), "eval/response_len": sum(lengths) / len(lengths),
                "eval/num_samples": float(len(scores))}
