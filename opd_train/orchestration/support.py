"""Small pieces the training loop uses: phase timers, evaluation, teacher-failure classification, save dirs."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

from ..config import Config


class Timer:
    """Seconds per phase of one rollout step (``time/<phase>``) and throughput (``perf/*``)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self, num_samples: int) -> dict[str, float]:
        total = time.perf_counter() - self.start
        return {**{f"time/{k}": v for k, v in self.phases.items()}, "perf/step_seconds": total,
                "perf/samples_per_second": num_samples / max(total, 1e-9)}


class TeacherUnavailable(RuntimeError):
    """The SGLang teacher did not answer after all retries; the run stopped with a resumable checkpoint."""

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url, self.checkpoint, self.checkpoint_step = url, None, None

    def with_checkpoint(self, path: str, step: int) -> "TeacherUnavailable":
        self.checkpoint, self.checkpoint_step = path, step
        return self


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


def as_teacher_failure(exc: BaseException, cfg: Config) -> BaseException:
    """A :class:`TeacherUnavailable` when ``exc`` is the teacher client giving up on ``--rm-url``, else ``exc``."""
    from ..rollout.engines import RequestFailed
    from ..rollout.manager import EndpointFailed
    from ..teacher import server_url
    cause = _root_cause(exc)
    url = cfg.reward.rm_url
    if url and isinstance(cause, (RequestFailed, EndpointFailed)) and cause.url.startswith(server_url(url)):
        return TeacherUnavailable(f"the teacher at {cause.url} did not answer after {cause.attempts} attempts "
                                  f"({cause}); the run stopped", url=cause.url)
    return exc


def _get_json(url: str, timeout: float):
    import json
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def preflight_teacher(cfg: Config, *, attempts: int = 3) -> dict:
    """Before anything starts (SGLang mode): the teacher answers ``/health`` and shares the student's vocabulary.

    The vocabulary is compared through the teacher's model directory when the server reports one that is readable
    here (``/get_model_info``: ``config.json`` vocab_size and ``tokenizer.json``), else through the ``vocab_size``
    that our CPU engine reports in ``/get_server_info``. Raises TeacherUnavailable / ConfigError.
    """
    import json

    from ..config import ConfigError
    from ..teacher import server_url
    base = server_url(cfg.reward.rm_url)
    last = None
    for attempt in range(attempts):
        try:
            _get_json(f"{base}/health", cfg.opd.opd_teacher_timeout)
            break
        except Exception as exc:  # noqa: BLE001 - any failure to answer means "not reachable"
            last = exc
            time.sleep(min(2.0 ** attempt, 5.0))
    else:
        raise TeacherUnavailable(f"the teacher at {base} is not reachable ({last}); start it first (GPU: python -m "
                                 f"sglang.launch_server --model-path TEACHER ...; CPU: opd-train serve --model "
                                 f"TEACHER --port PORT) and check --rm-url", url=base)
    facts: dict = {}
    try:
        info = _get_json(f"{base}/get_model_info", cfg.opd.opd_teacher_timeout) or {}
        server = _get_json(f"{base}/get_server_info", cfg.opd.opd_teacher_timeout) or {}
    except Exception:  # noqa: BLE001 - servers without these endpoints: nothing more to check
        return facts
    student_vocab = cfg.derived.get("vocab_size")
    path = info.get("model_path") or ""
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            facts["vocab_size"] = json.load(f).get("vocab_size")
        mine, theirs = (os.path.join(d, "tokenizer.json") for d in (cfg.model.hf_checkpoint, path))
        if os.path.isfile(mine) and os.path.isfile(theirs):
            with open(mine) as a, open(theirs) as b:
                if json.load(a).get("model", {}).get("vocab") != json.load(b).get("model", {}).get("vocab"):
                    raise ConfigError(f"the teacher's tokenizer ({path}) maps tokens differently from the student's "
                                      f"({cfg.model.hf_checkpoint}); OPD compares the same token ids")
    elif isinstance(server.get("vocab_size"), int):
        facts["vocab_size"] = server["vocab_size"]
    if facts.get("vocab_size") is not None and student_vocab is not None and facts["vocab_size"] != student_vocab:
        raise ConfigError(f"the teacher at {base} has vocab_size {facts['vocab_size']} but the student has "
                          f"{student_vocab}; OPD needs one shared tokenizer")
    return facts


def save_dir_of(cfg: Config) -> str:
    """Where checkpoints go: ``--save``, else ``OUTPUT_DIR/checkpoints`` (used for the failure checkpoint)."""
    return cfg.checkpoint.save or os.path.join(cfg.log.output_dir, "checkpoints")


def eval_settings(cfg: Config, prompts, rt, log):
    """``evaluate(step) -> metrics``: pass@1 on the held-out prompts with the engines' current weights."""
    import ray
    d = cfg.data

    def evaluate(step: int) -> dict:
        if prompts is None:
            return {}
        t0 = time.perf_counter()
        metrics = ray.get(rt.rollout.evaluate.remote(
            prompts, n=d.n_samples_per_eval_prompt, temperature=d.eval_temperature,
            max_new_tokens=d.eval_max_response_len or cfg.rollout.rollout_max_response_len))
        metrics["time/eval"] = time.perf_counter() - t0
        log.log(step, metrics)
        log.write(f"[opd-train] step {step}: eval pass@1 {metrics['eval/pass@1']:.3f} "
                  f"({int(metrics['eval/num_samples'])} samples)")
        return metrics
    return evaluate
