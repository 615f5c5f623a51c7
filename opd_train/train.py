"""The training loop of ``opd-train``: one rollout step reads as the algorithm (SPEC section 1).

    rollout (student engines; in sglang mode the teacher scores each sample as it finishes)
    -> old / ref / teacher log-probs (trainer forward)  -> advantages (base estimator)  -> apply_opd
    -> whiten -> train (policy loss; exact-KL loss in full mode) -> weight sync trainer -> engines
    -> eval / save
"""
from __future__ import annotations

import os

from .config import Config
from .observability import RunLogger
from .orchestration.runtime import Runtime, acquire, release
from .orchestration.step import (compute_step_advantages, loss_settings, rollout_metrics, teacher_logprobs,
                                 teacher_rows, to_train_batch)
from .rollout.data import PromptDataset, load_prompts, load_tokenizer
from .orchestration.support import (Timer, TeacherUnavailable, as_teacher_failure, eval_settings, preflight_teacher,
                                    save_dir_of)


def run(cfg: Config) -> dict:
    """Train for ``--num-rollout`` steps (resuming from ``--load``); returns the final metrics."""
    os.makedirs(cfg.log.output_dir, exist_ok=True)
    tok = load_tokenizer(cfg.model.hf_checkpoint)
    d = cfg.data
    train_prompts = load_prompts(d.prompt_data, tok, input_key=d.input_key, label_key=d.label_key,
                                 apply_chat_template=d.apply_chat_template,
                                 require_labels=bool(cfg.reward.rm_type or cfg.reward.eval_rm_type))
    eval_prompts = None if d.eval_prompt_data is None else load_prompts(
        d.eval_prompt_data, tok, input_key=d.input_key, label_key=d.label_key,
        apply_chat_template=d.apply_chat_template, max_prompts=d.eval_max_prompts, require_labels=True)
    dataset = PromptDataset(train_prompts, shuffle=d.rollout_shuffle, seed=cfg.rollout.rollout_seed)
    if cfg.opd.use_opd and cfg.opd.opd_type == "sglang":
        preflight_teacher(cfg)                  # fail before Ray, trainers and engines start
    rt = acquire(cfg, save_dir_of(cfg))
    healthy = False
    try:
        result = _loop(cfg, rt, dataset, eval_prompts)
        healthy = True
        return result
    finally:
        release(rt, healthy=healthy)


def _loop(cfg: Config, rt: Runtime, dataset: PromptDataset, eval_prompts) -> dict:
    import ray
    ro, ck = cfg.rollout, cfg.checkpoint
    start = rt.trainers.step() if ck.load else 0
    log = RunLogger(cfg.log, total_steps=ro.num_rollout, start_step=start, name=os.path.basename(cfg.log.output_dir))
    weights_dir = os.path.join(cfg.log.output_dir, "weights", "actor")
    if start:                                                   # resumed: engines must serve the trained weights
        ray.get(rt.rollout.update_weights.remote(rt.trainers.export_hf(weights_dir), f"step-{start}"))
    evaluate = eval_settings(cfg, eval_prompts, rt, log)
    final = evaluate(start) if start == 0 else {}
    step = start
    try:
        for step in range(start + 1, ro.num_rollout + 1):
            prompts = dataset.batch(step - 1, ro.rollout_batch_size)
            log.log(step, _rollout_step(cfg, rt, prompts, step, weights_dir))
            if _due(cfg.data.eval_interval, step, ro.num_rollout) and eval_prompts is not None:
                final = evaluate(step)
            if ck.save and _due(ck.save_interval, step, ro.num_rollout):
                rt.trainers.save_checkpoint(ck.save, step)
            log.advance()
    except TeacherUnavailable as exc:                           # retries are exhausted: stop resumably
        path = rt.trainers.save_checkpoint(save_dir_of(cfg), step - 1)
        log.write(f"[opd-train] {exc}\n[opd-train] saved a resumable checkpoint of step {step - 1}: {path}; "
                  f"restart the teacher and resume with --load {save_dir_of(cfg)}")
        raise exc.with_checkpoint(path, step - 1)
    finally:
        log.close()
    return {**log.last, **final, "step": step}


def _due(interval: int | None, step: int, last: int) -> bool:
    return step == last or bool(interval) and step % interval == 0


def _rollout_step(cfg: Config, rt: Runtime, prompts, step: int, weights_dir: str) -> dict[str, float]:
    """One step of the algorithm; returns its metrics."""
    import ray
    a, o, t = cfg.algo, cfg.opd, Timer()
    with t("rollout"):                  # student samples; sglang mode: each is scored by the teacher as it finishes
        try:
            samples, timing = ray.get(rt.rollout.generate.remote(prompts, step))
        except Exception as exc:        # noqa: BLE001 - a teacher that gave up becomes TeacherUnavailable
            raise as_teacher_failure(exc, cfg) from exc
        batch = to_train_batch(samples)
    with t("forward"):                  # old log-probs (+ entropy, reference, Megatron teacher, critic values)
        scored = rt.trainers.forward(batch, actor=True, with_entropy=True, ref=a.kl_coef > 0 or a.use_kl_loss,
                                     teacher=o.use_opd and o.opd_type == "megatron",
                                     values=a.advantage_estimator == "ppo")
    with t("advantages"):               # base estimator -> A - coef * kl (sampled mode) -> whitening
        adv = compute_step_advantages(
            a, o, samples=samples, group_size=cfg.rollout.n_samples_per_prompt, old_logprobs=scored.logprobs,
            teacher_lp=teacher_logprobs(samples, scored.teacher_logprobs) if o.use_opd else None,
            ref_logprobs=scored.ref_logprobs, values=scored.values)
    with t("train"):                    # policy loss (+ exact-KL loss in full mode), critic for ppo
        full = o.use_opd and o.opd_kl_mode == "full"
        rows = teacher_rows(samples, cfg.derived["vocab_size"]) if full and o.opd_type == "sglang" else None
        trained = rt.trainers.train(
            batch, adv.advantages, scored.logprobs, loss=loss_settings(a),
            global_batch_size=cfg.train.global_batch_size or len(batch), ref_logprobs=scored.ref_logprobs,
            returns=adv.returns, old_values=scored.values, opd_full_kl_coef=o.opd_kl_coef if full else None,
            teacher_rows=rows, shuffle_seed=cfg.train.seed * 1_000_003 + step)
    with t("weight_sync"):              # the engines serve the new weights for the next rollout
        ray.get(rt.rollout.update_weights.remote(rt.trainers.export_hf(weights_dir), f"step-{step}"))
    metrics = {**rollout_metrics(samples), **adv.metrics, **{f"train/{k}": v for k, v in trained.items()},
               **timing, **t.metrics(len(batch))}
    if scored.entropy is not None:
        metrics["train/entropy"] = sum(float(e.sum()) for e in scored.entropy) / batch.num_response_tokens()
    return metrics
