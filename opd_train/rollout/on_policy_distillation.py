"""SGLang-mode OPD reward hooks, slime-compatible dotted entry points (SPEC §3):

    --custom-rm-path opd_train.rollout.on_policy_distillation.reward_func
    --custom-reward-post-process-path opd_train.rollout.on_policy_distillation.post_process_rewards
    --rm-url http://TEACHER_HOST:PORT/generate

``async reward_func(args, sample)`` is awaited per sample as soon as that sample finishes generating, so teacher
scoring overlaps the rest of the rollout. It scores ``sample.tokens`` under the teacher, stores the response-span
log-probs on the sample (``sample.teacher_logprobs``, [response_length] fp32; plus ``teacher_topk_ids`` /
``teacher_topk_logprobs`` [R, K] when a top-k is configured) and returns a dict:
``{"reward": task reward or 0.0, "task_reward": float | None, "teacher_logprob_mean": float}``.

``post_process_rewards(args, samples) -> (raw_rewards, rewards)`` (slime's contract) scores, in one batched
request, any sample the reward function did not reach, checks every non-aborted sample has its teacher scores,
and returns the base-estimator rewards: 0.0 per sample for pure distillation, or the task reward when
``opd_task_rm_path`` is set (the reference throws the task reward away in this mode). Both lists are the same raw
values: group normalisation belongs to the advantage estimator.

Attributes read from ``args`` (the driver's config; absent attributes take the default):

=========================== ========= ==================================================================================
``rm_url``                  required  teacher ``/generate`` URL (``http://host:port`` also accepted)
``rollout_temperature``     1.0       the student's sampling temperature (see the temperature contract below)
``vocab_size``              None      ids are validated against it before sending (SGLang dies on bad ids)
``opd_teacher_topk``        0         also fetch the teacher's top-K per response position; -1 = full distribution
                                      (opd-train sets it from its OPD plan)
``opd_teacher_timeout``     60.0      seconds per attempt (``opd_train.types.TEACHER_TIMEOUT``)
``opd_teacher_max_retries`` 5         retries on connection errors / 5xx / timeouts / malformed bodies (backoff x2)
``opd_teacher_backoff``     0.5       first backoff in seconds (capped at 10 s)
``opd_teacher_concurrency`` 64        requests in flight to the teacher at most (one shared session per process)
``opd_task_rm_path``        None      dotted path of a task reward ``fn(args, sample)`` (sync or async) -> float, or a
                                      dict with ``reward_key`` / "reward"; combined with OPD as the base reward
``reward_key``              None      key into a dict task reward
=========================== ========= ==================================================================================

Temperature contract (SPEC §1): SGLang's teacher log-probs are at T=1. With ``rollout_temperature != 1`` the
teacher's full distribution (``opd_teacher_topk = -1`` or V) is rescaled exactly to T; anything else is refused.
``sample.metadata["teacher_temperature"]`` records which temperature the stored teacher numbers are at.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
from typing import Any

from ..teacher import SGLangTeacher, SGLangTeacherConfig, generate_url
from ..types import TEACHER_CONCURRENCY, TEACHER_MAX_RETRIES, TEACHER_TIMEOUT, Sample, Status

_TEACHERS: dict[tuple, SGLangTeacher] = {}
_LOCK = threading.Lock()


def teacher_config_from_args(args: Any) -> SGLangTeacherConfig:
    url = getattr(args, "rm_url", None)
    if not url:
        raise ValueError("SGLang-mode OPD needs the teacher URL: set --rm-url http://HOST:PORT/generate")
    vocab = getattr(args, "vocab_size", None)
    topk = int(getattr(args, "opd_teacher_topk", 0) or 0)
    if topk == -1:
        if vocab is None:
            raise ValueError("opd_teacher_topk=-1 (the teacher's full distribution) needs args.vocab_size")
        topk = vocab
    return SGLangTeacherConfig(
        url=generate_url(url), vocab_size=vocab, top_logprobs_num=topk,
        temperature=float(getattr(args, "rollout_temperature", 1.0) or 1.0),
        timeout=float(getattr(args, "opd_teacher_timeout", TEACHER_TIMEOUT)),
        max_retries=int(getattr(args, "opd_teacher_max_retries", TEACHER_MAX_RETRIES)),
        backoff=float(getattr(args, "opd_teacher_backoff", 0.5)),
        concurrency=int(getattr(args, "opd_teacher_concurrency", TEACHER_CONCURRENCY))).validate()


def get_teacher(args: Any) -> SGLangTeacher:
    """The process-wide teacher client for these settings (one shared HTTP session)."""
    config = teacher_config_from_args(args)
    key = tuple(sorted(vars(config).items()))
    with _LOCK:
        teacher = _TEACHERS.get(key)
        if teacher is None:
            teacher = _TEACHERS[key] = SGLangTeacher(config)
        return teacher


def close_teachers() -> None:
    with _LOCK:
        teachers = list(_TEACHERS.values())
        _TEACHERS.clear()
    for t in teachers:
        t.close()


def _load_task_rm(args: Any):
    path = getattr(args, "opd_task_rm_path", None)
    if not path:
        return None
    if callable(path):
        return path
    module, _, name = str(path).rpartition(".")
    if not module:
        raise ValueError(f"opd_task_rm_path={path!r} must be a dotted path module.function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import the task reward function {path!r}: {exc}") from exc


def _as_float(value: Any, args: Any) -> float:
    if isinstance(value, dict):
        key = getattr(args, "reward_key", None) or "reward"
        if key not in value:
            raise ValueError(f"the task reward returned a dict without key {key!r}: {value!r} (set reward_key)")
        value = value[key]
    return float(value)


async def _task_reward(args: Any, sample: Sample) -> float | None:
    fn = _load_task_rm(args)
    if fn is None:
        return None
    value = fn(args, sample)
    if inspect.isawaitable(value):
        value = await value
    return _as_float(value, args)


def _reward_dict(task: float | None, sample: Sample) -> dict:
    lp = sample.teacher_logprobs
    mean = float(lp.mean()) if lp is not None and lp.numel() else 0.0
    return {"reward": task if task is not None else 0.0, "task_reward": task, "teacher_logprob_mean": mean}


async def reward_func(args: Any, sample: Sample, **kwargs: Any) -> dict:
    """Score one finished sample under the teacher (stored on the sample) and return its reward dict."""
    teacher = get_teacher(args)
    score = asyncio.ensure_future(teacher.ascore_sample(sample))
    try:
        task = await _task_reward(args, sample)     # runs while the teacher request is in flight
    finally:
        await score
    return _reward_dict(task, sample)


def _run_sync(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Inside a running loop (e.g. a Ray async actor calling this sync hook): run on the HTTP client's own loop.
    return asyncio.run_coroutine_threadsafe(coro, _side_loop()).result()


_SIDE: dict[str, asyncio.AbstractEventLoop] = {}


def _side_loop() -> asyncio.AbstractEventLoop:
    with _LOCK:
        loop = _SIDE.get("loop")
        if loop is None:
            loop = _SIDE["loop"] = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="opd-reward", daemon=True).start()
        return loop


def post_process_rewards(args: Any, samples: list[Sample], **kwargs: Any) -> tuple[list[float], list[float]]:
    """Fill what ``reward_func`` did not reach (batched), check teacher spans, return (raw_rewards, rewards)."""
    live = [s for s in samples if s.status != Status.ABORTED]
    missing = [s for s in live if s.teacher_logprobs is None]
    if missing:
        get_teacher(args).score_samples(missing)
    for s in [s for s in live if s.reward is None]:
        s.reward = _reward_dict(_run_sync(_task_reward(args, s)), s)
    unscored = [s.index for s in live if s.teacher_logprobs is None]
    if unscored:
        raise ValueError(f"samples {unscored[:8]} have no teacher log-probs after scoring; refusing to train without "
                         "the teacher signal")
    rewards = [_base_reward(s, args) for s in samples]
    return rewards, list(rewards)


def _base_reward(sample: Sample, args: Any) -> float:
    if sample.status == Status.ABORTED or sample.reward is None:
        return 0.0
    if isinstance(sample.reward, dict):
        return float(sample.reward.get("reward", 0.0))
    return _as_float(sample.reward, args)
