"""The training loop of ``opd-train``: one rollout step reads as the algorithm (SPEC section 1).

    rollout (student engines; an SGLang teacher scores each sample as it finishes)
    -> base advantages (the estimator; PPO: after the critic's forward)
    -> OPD forward (trainer, one fused kernel per micro-batch: old log-probs, KL term, A' = A - coef * KL_t)
    -> whiten -> train (policy loss; + the KL loss in the distribution modes) -> weight sync -> eval / save

Which OPD mode runs was decided once, in validation (``cfg.plan``); this file only reads it.
"""
from __future__ import annotations

import os
import time

from .config import Config, ConfigError
from .observability import LOG_DIR, RunLogger, Timer, quiet_driver
from .orchestration.runtime import Runtime, RuntimePool
from .orchestration.settings import loss_settings
from .orchestration.step import (base_advantages, final_advantages, pre_forward, rollout_metrics, teacher_rows,
                                 train_batch)
from .rollout.data import PromptDataset, load_prompts, load_tokenizer
from .teacher import TeacherMismatch, preflight
from .lifecycle import RunInterrupted
from .types import TeacherUnavailable


def run(cfg: Config, *, pool: RuntimePool | None = None) -> dict:
    """Train for ``--num-rollout`` steps (resuming from ``--load``); returns the final metrics.

    ``pool``: keep the runtime (Ray actors, engines) warm for the pool's next run of the same shape.
    """
    os.makedirs(cfg.log.output_dir, exist_ok=True)
    if quiet_driver(cfg.log.output_dir, cfg.log.verbose):
        print(f"[opd-train] {cfg.log.output_dir}: Ray, Megatron, engine and warning output in {LOG_DIR}/ "
              "(--verbose shows it here)", flush=True)
    tok = load_tokenizer(cfg.model.hf_checkpoint)
    d = cfg.data
    train_prompts = load_prompts(d.prompt_data, tok, input_key=d.input_key, label_key=d.label_key,
                                 apply_chat_template=d.apply_chat_template,
                                 require_labels=bool(cfg.reward.rm_type or cfg.reward.eval_rm_type))
    eval_prompts = None if d.eval_prompt_data is None else load_prompts(
        d.eval_prompt_data, tok, input_key=d.input_key, label_key=d.label_key,
        apply_chat_template=d.apply_chat_template, max_prompts=d.eval_max_prompts, require_labels=True)
    dataset = PromptDataset(train_prompts, shuffle=d.rollout_shuffle, seed=cfg.rollout.rollout_seed)
    if cfg.plan is not None and cfg.plan.teacher == "sglang":        # fail before Ray, trainers and engines start
        try:
            preflight(cfg.reward.rm_url, student_dir=cfg.model.hf_checkpoint, student_vocab=cfg.derived["vocab_size"],
                      timeout=cfg.opd.opd_teacher_timeout)
        except TeacherMismatch as exc:
            raise ConfigError(str(exc)) from None
    rt = pool.acquire(cfg, cfg.save_dir) if pool is not None else Runtime.start(cfg, cfg.save_dir)
    healthy = False
    try:
        result = _loop(cfg, rt, dataset, eval_prompts)
        healthy = True
        return result
    finally:
        if pool is not None:
            pool.release(rt, healthy=healthy)
        else:
            rt.close()


def _loop(cfg: Config, rt: Runtime, dataset: PromptDataset, eval_prompts) -> dict:
    import ray
    ro, ck = cfg.rollout, cfg.checkpoint
    start = rt.trainers.step() if ck.load else 0
    log = RunLogger(cfg.log, total_steps=ro.num_rollout, start_step=start, name=os.path.basename(cfg.log.output_dir))
    weights_dir = os.path.join(cfg.log.output_dir, "weights", "actor")
    if start:                                                   # resumed: engines must serve the trained weights
        ray.get(rt.rollout.update_weights.remote(rt.trainers.export_hf(weights_dir), f"step-{start}"))
    final = _evaluate(cfg, rt, eval_prompts, log, start) if start == 0 else {}
    step = start
    try:
        for step in range(start + 1, ro.num_rollout + 1):
            prompts = dataset.batch(step - 1, ro.rollout_batch_size)
            log.log(step, _rollout_step(cfg, rt, prompts, step, weights_dir))
            if _due(cfg.data.eval_interval, step, ro.num_rollout):
                final = _evaluate(cfg, rt, eval_prompts, log, step) or final
            if ck.save and _due(ck.save_interval, step, ro.num_rollout):
                rt.trainers.save_checkpoint(ck.save, step)
            log.advance()
    except RunInterrupted as exc:                               # SIGTERM / SIGINT / SIGHUP: stop resumably
        done = step - 1
        if done > start:
            path = rt.trainers.save_checkpoint(cfg.save_dir, done)
            log.write(f"[opd-train] {exc} during step {step}; saved a checkpoint of step {done}: {path}\n"
                      f"[opd-train] resume with: --load {cfg.save_dir}")
        else:
            log.write(f"[opd-train] {exc} during step {step}: no step completed since the start, nothing to save")
        raise
    except TeacherUnavailable as exc:                           # retries are exhausted: stop resumably
        path = rt.trainers.save_checkpoint(cfg.save_dir, step - 1)
        log.write(f"[opd-train] {exc}\n[opd-train] saved a resumable checkpoint of step {step - 1}: {path}; "
                  f"restart the teacher and resume with --load {cfg.save_dir}")
        raise exc.with_checkpoint(path, step - 1)
    finally:
        log.close()
    return {**log.last, **final, "step": step}


def _due(interval: int | None, step: int, last: int) -> bool:
    return step == last or bool(interval) and step % interval == 0


def _rollout_step(cfg: Config, rt: Runtime, prompts, step: int, weights_dir: str) -> dict[str, float]:
    """One step of the algorithm; returns its metrics."""
    import ray
    a, plan, t = cfg.algo, cfg.plan, Timer()
    with t("rollout"):                  # student samples; an SGLang teacher scores each as it finishes
        samples, timing = rt.generate(prompts, step)
        batch, teacher = train_batch(samples), teacher_rows(plan, samples)
    with t("forward"):                  # base advantages, then the OPD forward: A' = A - coef * KL_t (fused kernel)
        before = pre_forward(a)
        pre = rt.trainers.forward(batch, **before) if before else None          # critic values, ref-KL rewards
        base = base_advantages(a, samples, cfg.rollout.n_samples_per_prompt, pre)
        ref = pre.ref_logprobs if pre is not None else None
        scored = rt.trainers.forward(batch, advantages=base.advantages if plan else None, teacher=teacher,
                                     ref=a.use_kl_loss and ref is None)
    with t("advantages"):               # whitening over the global batch
        advantages, adv_metrics = final_advantages(a, base, scored)
    with t("train"):                    # policy loss (+ the KL loss in the distribution modes), critic for ppo
        trained = rt.trainers.train(
            batch, advantages, scored.logprobs, loss=loss_settings(a),
            global_batch_size=cfg.train.global_batch_size or len(batch), ref_logprobs=ref or scored.ref_logprobs,
            returns=base.returns, old_values=None if pre is None else pre.values,
            teacher=teacher if plan is not None and not plan.sampled else None,
            shuffle_seed=cfg.train.seed * 1_000_003 + step)
    with t("weight_sync"):              # the engines serve the new weights for the next rollout
        ray.get(rt.rollout.update_weights.remote(rt.trainers.export_hf(weights_dir), f"step-{step}"))
    return {**rollout_metrics(samples), **adv_metrics, **{f"train/{k}": v for k, v in trained.items()},
            **timing, **t.metrics(len(batch))}


def _evaluate(cfg: Config, rt: Runtime, prompts, log: RunLogger, step: int) -> dict:
    """pass@1 on the held-out prompts with the engines' current weights (logged; {} without eval prompts)."""
    import ray
    if prompts is None:
        return {}
    d, t0 = cfg.data, time.perf_counter()
    metrics = ray.get(rt.rollout.evaluate.remote(
        prompts, n=d.n_samples_per_eval_prompt, temperature=d.eval_temperature,
        max_new_tokens=d.eval_max_response_len or cfg.rollout.rollout_max_response_len))
    metrics["time/eval"] = time.perf_counter() - t0
    log.log(step, metrics)
    log.write(f"[opd-train] step {step}: eval pass@1 {metrics['eval/pass@1']:.3f} "
              f"({int(metrics['eval/num_samples'])} samples)")
    return metrics
