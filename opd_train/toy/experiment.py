"""The built-in CPU experiment: what ``opd-train`` runs with no model given.

1. SFT (plain PyTorch, cached) of a teacher and of a weaker student on the toy task (:mod:`.task`), both tiny
   Qwen3 models saved as HF directories with the task's own tokenizer.
2. The teacher is served over HTTP by our SGLang-protocol CPU engine (a separate server process).
3. OPD run: the student trained by on-policy distillation only (task reward 0, teacher's exact reverse KL),
   with ``--opd-type sglang`` (teacher over HTTP, full distribution) or ``--opd-type megatron`` (teacher
   converted to torch_dist and loaded in the trainer).
4. Baseline: reward-only GRPO from the same student, same number of steps and samples (``--no-experiment-
   baseline`` skips it).
5. The result table (held-out greedy pass@1) is printed and written to ``OUTPUT_DIR/results.json`` with the
   curves of both runs in ``OUTPUT_DIR/curves.png``.

Flags given on the command line override the experiment's defaults for the OPD run (e.g. ``--num-rollout``,
``--opd-kl-mode sampled``, ``--advantage-estimator ppo``); the baseline keeps its own learning rate.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

from ..config import ConfigError, build_config, validate
from ..orchestration.cluster import start_ray
from . import task
from .models import SFTSettings, TinyModel, build_sft_model

TEACHER = TinyModel(hidden=128, layers=4, heads=4, intermediate=512)
STUDENT = TinyModel(hidden=64, layers=2, heads=4, intermediate=256)


@dataclass(frozen=True)
class Plan:
    teacher_sft: SFTSettings
    student_sft: SFTSettings
    train_prompts: int
    eval_prompts: int
    run_defaults: dict           # flag values of the OPD run (user flags override them)


def plan(fast: bool, seed: int = 0) -> Plan:
    """The experiment's settings (``fast``: a short run for tests; ``seed`` moves every seed of the experiment)."""
    defaults = dict(rollout_batch_size=128, n_samples_per_prompt=4, global_batch_size=128, num_rollout=60,
                    rollout_max_response_len=6, rollout_temperature=1.0, lr=1e-3, lr_decay_style="cosine",
                    min_lr=0.0, adam_beta2=0.98, clip_grad=1.0,
                    use_opd=True, opd_type="sglang", opd_kl_mode="full", opd_kl_coef=1.0, eval_interval=10,
                    eval_temperature=0.0, eval_rm_type="exact_match", eval_max_response_len=6,
                    advantage_estimator="grpo", rollout_shuffle=True, max_tokens_per_gpu=512,
                    rollout_seed=42 + seed, seed=1234 + seed)
    if fast:      # exercises every piece in seconds; the numbers of the table are meaningless
        defaults.update(rollout_batch_size=4, global_batch_size=8, num_rollout=2, eval_interval=2,
                        max_tokens_per_gpu=512)
        return Plan(teacher_sft=SFTSettings(STUDENT, steps=30, lr=3e-3, batch_size=32, seed=2 * seed),
                    student_sft=SFTSettings(STUDENT, steps=5, lr=1e-3, batch_size=32, seed=2 * seed + 1),
                    train_prompts=256, eval_prompts=16, run_defaults=defaults)
    return Plan(teacher_sft=SFTSettings(TEACHER, steps=1200, lr=1e-3, batch_size=128, seed=2 * seed,
                                        stop_at_accuracy=0.985, check_every=25),
                student_sft=SFTSettings(STUDENT, steps=800, lr=1e-3, batch_size=128, seed=2 * seed + 1,
                                        stop_at_accuracy=0.4),
                train_prompts=20000, eval_prompts=512, run_defaults=defaults)


def _run_values(plan_: Plan, user: dict, *, hf: str, train: str, evals: str, out: str, teacher_url: str | None,
                teacher_dist: str | None) -> dict:
    values = {**plan_.run_defaults, **user, "hf_checkpoint": hf, "prompt_data": train, "eval_prompt_data": evals,
              "output_dir": out}
    if values.get("use_opd") and values.get("opd_type") == "sglang":
        values.setdefault("rm_url", teacher_url)
    if values.get("use_opd") and values.get("opd_type") == "megatron":
        values.setdefault("opd_teacher_load", teacher_dist)
    if "opd_kl_estimator" in user and "opd_kl_mode" not in user:
        values["opd_kl_mode"] = "sampled"        # an explicit estimator means the sampled-token mode
    return values


def _baseline_values(opd_values: dict, lr: float, out: str) -> dict:
    drop = {k for k in opd_values if k.startswith("opd_") or k in ("use_opd", "rm_url", "offload_teacher")}
    values = {k: v for k, v in opd_values.items() if k not in drop}
    return {**values, "use_opd": False, "rm_type": "exact_match", "advantage_estimator": "grpo", "lr": lr,
            "output_dir": out}


def _convert_teacher(hf_dir: str) -> str:
    """The teacher as a torch_dist checkpoint (Megatron mode), converted once next to the cached HF dir."""
    out = hf_dir + "-torch_dist"
    if not os.path.isfile(os.path.join(out, "latest_checkpointed_iteration.txt")):
        subprocess.run([sys.executable, "-m", "opd_train.cli", "convert", "hf2dist", hf_dir, out], check=True)
    return out


def _check_user_flags(plan_: Plan, user: dict) -> None:
    """Validate the OPD run's flags before any SFT or server starts (paths do not exist yet)."""
    placeholder = _run_values(plan_, user, hf=None, train=None, evals=None, out=user.get("output_dir", "."),
                              teacher_url="http://127.0.0.1:1/generate", teacher_dist="/nonexistent")
    validate(build_config(placeholder), check_paths=False)


def run_experiment(user: dict) -> dict:
    """Run the whole experiment; ``user`` holds the flags given explicitly. Returns the results dict."""
    from ..rollout.engines import launch_cpu_engine
    from .report import evaluate_teacher, write_results
    exp = build_config({k: v for k, v in user.items() if k.startswith("experiment_")}).experiment
    plan_ = plan(exp.experiment_fast, exp.experiment_seed)
    _check_user_flags(plan_, user)
    out = user.get("output_dir") or "runs/opd"
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    eval_pairs = task.sample_pairs(random.Random(1), 512, held_out=True)
    teacher_dir, teacher_meta = build_sft_model(plan_.teacher_sft, exp.experiment_cache_dir, "teacher",
                                                eval_pairs=eval_pairs)
    student_dir, student_meta = build_sft_model(plan_.student_sft, exp.experiment_cache_dir, "student",
                                                eval_pairs=eval_pairs)
    train_file, eval_file = task.write_task_files(os.path.join(out, "data"), train_prompts=plan_.train_prompts,
                                                  eval_prompts=plan_.eval_prompts, seed=0)
    megatron = user.get("opd_type", plan_.run_defaults["opd_type"]) == "megatron"
    teacher_dist = _convert_teacher(teacher_dir) if megatron else None
    teacher = launch_cpu_engine(teacher_dir, log_path=os.path.join(out, "teacher_server.log"))
    started_ray = start_ray(build_config(user).cluster, min_cpus=4)
    try:
        teacher_acc = evaluate_teacher(teacher.url, eval_file)
        opd_values = _run_values(plan_, user, hf=student_dir, train=train_file, evals=eval_file,
                                 out=os.path.join(out, "opd"), teacher_url=teacher.url + "/generate",
                                 teacher_dist=teacher_dist)
        runs = {"opd": opd_values}
        if exp.experiment_baseline:
            runs["grpo"] = _baseline_values(opd_values, exp.experiment_baseline_lr, os.path.join(out, "grpo"))
        results = {}
        from ..orchestration.runtime import warm_runtimes
        from ..train import run
        with warm_runtimes():               # the baseline reuses the OPD run's actors and engines
            for name, values in runs.items():
                print(f"[experiment] {name} run -> {values['output_dir']}", flush=True)
                results[name] = run(validate(build_config(values)))
    finally:
        teacher.stop()
        if started_ray:
            import ray
            ray.shutdown()
    return write_results(out, teacher_acc=teacher_acc, teacher_meta=teacher_meta, student_meta=student_meta,
                         runs=runs, results=results, seconds=time.perf_counter() - started)


__all__ = ["ConfigError", "plan", "run_experiment"]
