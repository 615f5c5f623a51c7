"""Every cross-flag rule of ``opd-train`` (SPEC section 2 and the driver's own), checked before anything starts.

Each rule raises :class:`~.sections.ConfigError` with one message naming the flag and the fix. Only cheap checks
run here (files read, modules imported); the SGLang teacher server is checked by the driver's preflight.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from .. import hf
from ..types import GROUP_ESTIMATORS
from .plan import MAX_FULL_KL_HTTP_VOCAB, OPDPlan
from .sections import OPD_POST_PROCESS, OPD_REWARD_FUNC, Config, ConfigError, DataConfig, ModelConfig


def _fail(message: str) -> None:
    raise ConfigError(message)


def _dotted_callable(flag: str, path: str | None) -> None:
    if path is None:
        return
    module, _, name = path.rpartition(".")
    if not module or not re.fullmatch(r"[A-Za-z_][\w.]*", path):
        _fail(f"{flag} {path!r} must be a dotted path module.function (e.g. my_pkg.rewards.score)")
    import importlib
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        _fail(f"{flag} {path!r} cannot be imported ({exc}); make the module importable (PYTHONPATH) or fix the path")
    if not callable(fn):
        _fail(f"{flag} {path!r} is not callable")


def teacher_hf_dir(load: str, step: int | None) -> str:
    """The directory holding the Megatron teacher's HF config (a HF dir, or ``iter_N/hf`` of a checkpoint)."""
    if os.path.isfile(os.path.join(load, "config.json")):
        return load
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt")
    if step is None:
        if not os.path.isfile(tracker):
            _fail(f"--opd-teacher-load {load!r} is neither a HF directory (config.json) nor a torch_dist checkpoint "
                  "(latest_checkpointed_iteration.txt); convert it with `opd-train convert hf2dist HF_DIR OUT_DIR`")
        with open(tracker) as f:
            step = int(f.read().strip())
    it = os.path.join(load, f"iter_{step:07d}")
    if not os.path.isdir(it):
        have = sorted(n for n in os.listdir(load) if n.startswith("iter_"))
        _fail(f"--opd-teacher-ckpt-step {step}: {it} does not exist; available: {', '.join(have) or 'none'}")
    return os.path.join(it, "hf")


def _validate_opd(c: Config) -> OPDPlan | None:
    """Every OPD rule, and the plan they leave (None without --use-opd)."""
    o, r = c.opd, c.reward
    if not o.use_opd:
        for flag, value in (("--opd-type", o.opd_type), ("--opd-teacher-load", o.opd_teacher_load),
                            ("--opd-teacher-ckpt-step", o.opd_teacher_ckpt_step),
                            ("--opd-teacher-topk", o.opd_teacher_topk)):
            if value is not None:
                _fail(f"{flag} is set but --use-opd is not; add --use-opd or drop {flag}")
        if r.rm_url is not None:
            _fail("--rm-url is the SGLang teacher endpoint of OPD; add --use-opd --opd-type sglang or drop --rm-url")
        return None
    if o.opd_type is None:
        _fail("--use-opd needs --opd-type: sglang (teacher on an HTTP server, with --rm-url) or megatron "
              "(teacher checkpoint in the trainer, with --opd-teacher-load)")
    if not (isinstance(o.opd_kl_coef, (int, float)) and math.isfinite(o.opd_kl_coef) and o.opd_kl_coef >= 0):
        _fail(f"--opd-kl-coef must be a finite number >= 0, got {o.opd_kl_coef}")
    if o.opd_kl_mode != "sampled" and o.opd_kl_estimator is not None:
        _fail(f"--opd-kl-estimator selects the sampled-token estimator; with --opd-kl-mode {o.opd_kl_mode} the KL "
              "is computed from the teacher's distribution: drop one of them")
    if o.opd_kl_mode == "topk" and o.opd_teacher_topk is None:
        _fail("--opd-kl-mode topk needs --opd-teacher-topk K (teacher log-probs per response position, e.g. 64)")
    if o.opd_kl_mode != "topk" and o.opd_teacher_topk is not None:
        _fail("--opd-teacher-topk is the K of --opd-kl-mode topk; add --opd-kl-mode topk or drop it")
    if o.opd_type == "sglang":
        return _validate_opd_sglang(c)
    return _validate_opd_megatron(c)


def _validate_opd_sglang(c: Config) -> OPDPlan:
    o, r = c.opd, c.reward
    if o.opd_teacher_load is not None:
        _fail("--opd-teacher-load is for --opd-type megatron; in sglang mode the teacher is the server at --rm-url")
    if o.opd_teacher_ckpt_step is not None:
        _fail("--opd-teacher-ckpt-step is for --opd-type megatron (the teacher checkpoint loaded by the trainer)")
    if o.offload_teacher:
        _fail("--offload-teacher is for --opd-type megatron (the SGLang teacher is not in the trainer)")
    if not r.rm_url:
        _fail("--opd-type sglang needs the teacher URL: --rm-url http://HOST:PORT/generate (start the teacher with "
              "`python -m sglang.launch_server` on GPU or `opd-train serve --model DIR` on CPU)")
    if not re.match(r"^https?://[^/\s:]+(:\d+)?(/generate)?/?$", r.rm_url):
        _fail(f"--rm-url {r.rm_url!r} must look like http://HOST:PORT/generate")
    if r.custom_rm_path not in (None, OPD_REWARD_FUNC):
        _fail(f"--custom-rm-path {r.custom_rm_path!r}: in sglang mode the teacher is scored by {OPD_REWARD_FUNC}; "
              "keep it (or drop --custom-rm-path) and pass your task reward as --opd-task-rm-path")
    if r.custom_reward_post_process_path not in (None, OPD_POST_PROCESS):
        _fail(f"--custom-reward-post-process-path {r.custom_reward_post_process_path!r}: in sglang mode use "
              f"{OPD_POST_PROCESS} (or drop the flag)")
    if o.opd_task_rm_path is not None and r.rm_type is not None:
        _fail("--opd-task-rm-path and --rm-type both name the task reward; keep one")
    _dotted_callable("--opd-task-rm-path", o.opd_task_rm_path)
    return _sglang_plan(c)


def _sglang_plan(c: Config) -> OPDPlan:
    """How many teacher log-probs per position to request: 0 (sampled), K (topk) or V (full, or T != 1)."""
    o, temperature = c.opd, c.rollout.rollout_temperature
    vocab = c.derived.get("vocab_size")
    kl = (o.opd_kl_estimator or "k1") if o.opd_kl_mode == "sampled" else o.opd_kl_mode
    if o.opd_kl_mode == "topk":
        if o.opd_teacher_topk < 1 or (vocab is not None and o.opd_teacher_topk >= vocab):
            _fail(f"--opd-teacher-topk {o.opd_teacher_topk} must be >= 1 and below the vocabulary size "
                  f"{vocab if vocab is not None else 'V'} (use --opd-kl-mode full for the whole distribution)")
        if temperature != 1.0:
            _fail(f"--rollout-temperature {temperature} with --opd-kl-mode topk: an SGLang teacher returns log-probs "
                  "at T=1 only, and a truncated top-k cannot be rescaled to T exactly; roll out at temperature 1")
        return OPDPlan("sglang", "topk", o.opd_kl_coef, teacher_topk=o.opd_teacher_topk, temperature=temperature)
    needs_full = o.opd_kl_mode == "full" or temperature != 1.0
    if needs_full and vocab is not None and vocab > MAX_FULL_KL_HTTP_VOCAB:
        why = ("--opd-kl-mode full fetches" if o.opd_kl_mode == "full" else
               f"--rollout-temperature {temperature} needs the teacher log-probs at T, i.e. fetching")
        _fail(f"{why} the teacher's full distribution over HTTP (top_logprobs_num = vocab size = {vocab}); above "
              f"{MAX_FULL_KL_HTTP_VOCAB} that is too large: use --opd-kl-mode topk --opd-teacher-topk K (the KL over "
              "the teacher's top-K), --opd-type megatron (the exact KL from logits in the trainer), or roll out at T=1")
    return OPDPlan("sglang", kl, o.opd_kl_coef, teacher_topk=(vocab or 0) if needs_full else 0,
                   temperature=temperature)


def _validate_opd_megatron(c: Config) -> OPDPlan:
    o, r = c.opd, c.reward
    if o.opd_teacher_ckpt_step is not None and o.opd_teacher_ckpt_step < 0:
        _fail(f"--opd-teacher-ckpt-step must be >= 0, got {o.opd_teacher_ckpt_step}")
    if o.opd_teacher_load is None:
        _fail("--opd-type megatron needs --opd-teacher-load DIR (the teacher's torch_dist checkpoint; make one "
              "with `opd-train convert hf2dist HF_DIR OUT_DIR`)")
    if o.opd_kl_mode == "topk":
        _fail("--opd-kl-mode topk is for an SGLang teacher; the Megatron teacher's logits are in the trainer: use "
              "--opd-kl-mode full (the exact KL) or sampled")
    plan = OPDPlan("megatron", (o.opd_kl_estimator or "k1") if o.opd_kl_mode == "sampled" else "full", o.opd_kl_coef,
                   temperature=c.rollout.rollout_temperature)
    if r.rm_url is not None:
        _fail("--rm-url is the SGLang teacher endpoint; with --opd-type megatron the teacher runs in the trainer: "
              "drop --rm-url (or use --opd-type sglang)")
    for flag, path, opd_path in (("--custom-rm-path", r.custom_rm_path, OPD_REWARD_FUNC),
                                 ("--custom-reward-post-process-path", r.custom_reward_post_process_path,
                                  OPD_POST_PROCESS)):
        if path == opd_path:
            _fail(f"{flag} {path} scores an SGLang teacher; with --opd-type megatron drop it (the trainer scores "
                  "the teacher)")
    if o.opd_task_rm_path is not None:
        _fail("--opd-task-rm-path is for sglang mode; with --opd-type megatron pass the task reward as --rm-type or "
              "--custom-rm-path")
    if c.derived.get("check_paths", True):
        if not os.path.isdir(o.opd_teacher_load):
            _fail(f"--opd-teacher-load {o.opd_teacher_load!r} does not exist; pass the teacher checkpoint directory")
        _check_teacher_vocab(c)
    return plan


def _check_teacher_vocab(c: Config) -> None:
    student = c.model.hf_checkpoint
    if student is None or not os.path.isfile(os.path.join(student, "config.json")):
        return
    tdir = teacher_hf_dir(c.opd.opd_teacher_load, c.opd.opd_teacher_ckpt_step)
    if not os.path.isfile(os.path.join(tdir, "config.json")):
        return
    problem = hf.teacher_mismatch(student, hf.read_config(student).get("vocab_size"), tdir,
                                  hf.read_config(tdir).get("vocab_size"))
    if problem:
        _fail(problem)


def _validate_rewards(c: Config) -> None:
    r = c.reward
    _dotted_callable("--custom-rm-path", r.custom_rm_path)
    _dotted_callable("--custom-reward-post-process-path", r.custom_reward_post_process_path)
    if r.custom_rm_path is not None and r.rm_type is not None and not c.opd.use_opd:
        _fail("--custom-rm-path and --rm-type both choose the reward; keep one")
    if not c.opd.use_opd and r.custom_rm_path is None and r.rm_type is None:
        _fail("no training signal: pass a task reward (--rm-type exact_match|math or --custom-rm-path) and/or "
              "--use-opd with a teacher")
    if (r.rm_type is not None or c.opd.opd_task_rm_path) and c.data.label_key is None and c.data.prompt_data:
        _fail("the task reward compares against labels: set --label-key to the column holding them")


def _validate_batches(c: Config, world: int) -> None:
    ro, t, a = c.rollout, c.train, c.algo
    for flag, value in (("--rollout-batch-size", ro.rollout_batch_size), ("--n-samples-per-prompt",
                        ro.n_samples_per_prompt), ("--num-rollout", ro.num_rollout),
                        ("--rollout-max-response-len", ro.rollout_max_response_len),
                        ("--rollout-num-engines", ro.rollout_num_engines),
                        ("--tensor-model-parallel-size", t.tensor_model_parallel_size),
                        ("--actor-num-nodes", t.actor_num_nodes), ("--actor-num-gpus-per-node",
                        t.actor_num_gpus_per_node), ("--max-tokens-per-gpu", t.max_tokens_per_gpu),
                        ("--n-samples-per-eval-prompt", c.data.n_samples_per_eval_prompt)):
        if value < 1:
            _fail(f"{flag} must be >= 1, got {value}")
    if c.cluster.trainer_threads is not None and c.cluster.trainer_threads < 1:
        _fail(f"--trainer-threads must be >= 1 (or left out for the default), got {c.cluster.trainer_threads}")
    if t.fused_linear_chunk_tokens is not None and t.fused_linear_chunk_tokens < 1:
        _fail(f"--fused-linear-chunk-tokens must be >= 1 (or left out for the 64 MiB default), got "
              f"{t.fused_linear_chunk_tokens}")
    if not ro.rollout_temperature > 0:
        _fail(f"--rollout-temperature must be > 0 for training rollouts (log-probs of logits / T), got "
              f"{ro.rollout_temperature}")
    if not 0 < ro.rollout_top_p <= 1 or ro.rollout_top_k == 0 or ro.rollout_top_k < -1:
        _fail("--rollout-top-p must be in (0, 1] and --rollout-top-k -1 (off) or >= 1")
    if a.advantage_estimator in GROUP_ESTIMATORS and ro.n_samples_per_prompt < 2:
        _fail(f"--advantage-estimator {a.advantage_estimator} normalises within a group of samples of one prompt: "
              "use --n-samples-per-prompt >= 2")
    total = ro.rollout_batch_size * ro.n_samples_per_prompt
    gbs = t.global_batch_size or total
    if gbs < 1 or total % gbs:
        _fail(f"--global-batch-size {gbs} must divide rollout_batch_size * n_samples_per_prompt = {total} (the "
              "rollout is split into whole optimizer steps)")
    if world % t.tensor_model_parallel_size:
        _fail(f"--tensor-model-parallel-size {t.tensor_model_parallel_size} must divide the trainer world size "
              f"{world} (--actor-num-nodes x --actor-num-gpus-per-node)")
    dp = world // t.tensor_model_parallel_size
    if gbs % dp:
        _fail(f"--global-batch-size {gbs} must be divisible by the data-parallel size {dp}")
    if c.data.eval_interval is not None and c.data.eval_interval < 1:
        _fail(f"--eval-interval must be >= 1, got {c.data.eval_interval}")
    if c.data.eval_interval is not None and c.data.eval_prompt_data is None and c.model.hf_checkpoint:
        _fail("--eval-interval needs --eval-prompt-data (the held-out prompts)")
    if c.data.eval_prompt_data is not None and not (c.reward.eval_rm_type or c.reward.rm_type):
        _fail("--eval-prompt-data needs a reward to score pass@1: set --eval-rm-type (or --rm-type)")


def _validate_algo(c: Config) -> None:
    a, t = c.algo, c.train
    for flag, value in (("--lr", t.lr), ("--eps-clip", a.eps_clip), ("--gamma", a.gamma), ("--lambd", a.lambd),
                        ("--kl-coef", a.kl_coef), ("--kl-loss-coef", a.kl_loss_coef), ("--clip-grad", t.clip_grad),
                        ("--entropy-coef", a.entropy_coef)):
        if not (math.isfinite(value) and value >= 0):
            _fail(f"{flag} must be a finite number >= 0, got {value}")
    if not t.lr > 0:
        _fail("--lr must be > 0")
    if not 0 <= a.gamma <= 1 or not 0 <= a.lambd <= 1:
        _fail("--gamma and --lambd must be in [0, 1]")
    if a.eps_clip_c is not None and a.eps_clip_c <= 1:
        _fail(f"--eps-clip-c (dual clip) must be > 1, got {a.eps_clip_c}")
    if a.kl_loss_coef > 0 and not a.use_kl_loss:
        _fail("--kl-loss-coef is set but --use-kl-loss is not; add --use-kl-loss")
    if a.kl_coef > 0 and a.advantage_estimator in ("grpo", "gspo"):
        _fail(f"--kl-coef is a reward penalty of ppo / reinforce_plus_plus*; {a.advantage_estimator} has no token "
              "rewards: use --use-kl-loss --kl-loss-coef instead")
    if a.critic_lr is not None and a.advantage_estimator != "ppo":
        _fail("--critic-lr is only used by --advantage-estimator ppo (the critic)")
    for flag, patterns in (("--only-train-params-name-list", t.only_train_params_name_list),
                           ("--freeze-params-name-list", t.freeze_params_name_list)):
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                _fail(f"{flag} {pattern!r} is not a regular expression ({exc}); each is searched in the Megatron "
                      "parameter names, e.g. 'embedding' or 'decoder.layers.2[0-3].'")


def _validate_paths_and_devices(c: Config, cuda_available: bool, check_paths: bool) -> None:
    m, d = c.model, c.data
    if not check_paths:
        m, d = ModelConfig(), DataConfig()          # the experiment fills the paths in later
    if m.hf_checkpoint is not None and not os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
        _fail(f"--hf-checkpoint {m.hf_checkpoint!r} is not a HF model directory (no config.json)")
    for flag, path in (("--prompt-data", d.prompt_data), ("--eval-prompt-data", d.eval_prompt_data)):
        if path is not None:
            if not os.path.isfile(path):
                _fail(f"{flag} {path!r}: file not found")
            if not path.endswith((".jsonl", ".json", ".parquet")):
                _fail(f"{flag} {path!r}: use a .jsonl or .parquet file")
    if m.hf_checkpoint is not None and d.prompt_data is None:
        _fail("--hf-checkpoint needs --prompt-data (the training prompts)")
    for flag, path in (("--ref-load", m.ref_load), ("--critic-load", m.critic_load)):
        if path is not None and not os.path.isdir(path):
            _fail(f"{flag} {path!r} does not exist")
    if m.critic_load is not None and c.algo.advantage_estimator != "ppo":
        _fail("--critic-load is only used by --advantage-estimator ppo")
    if c.checkpoint.save_interval is not None and (c.checkpoint.save is None or c.checkpoint.save_interval < 1):
        _fail("--save-interval needs --save DIR and must be >= 1")
    if c.cluster.device == "cuda" and not cuda_available and c.cluster.ray_address is None:
        _fail("--device cuda but no CUDA device is visible here; use --device cpu (or auto), or --ray-address of a "
              "cluster with GPUs")
    if c.rollout.rollout_engine == "sglang" and not cuda_available and c.cluster.ray_address is None:
        _fail("--rollout-engine sglang needs GPUs (SGLang has no CPU build here); use --rollout-engine cpu or auto")
    if c.cluster.ray_address is not None and not re.match(r"^(auto|ray://\S+|[\w.\-]+:\d+)$", c.cluster.ray_address):
        _fail(f"--ray-address {c.cluster.ray_address!r}: use auto, HOST:PORT or ray://HOST:PORT")


PATH_FIELDS = ("hf_checkpoint", "ref_load", "critic_load", "prompt_data", "eval_prompt_data", "opd_teacher_load",
               "load", "save", "output_dir", "experiment_cache_dir")


def _absolute_paths(config: Config) -> Config:
    """Paths as absolute paths: Ray actors and server subprocesses may not share the driver's working directory."""
    flat = config.to_flat_dict()
    fixed = {k: os.path.abspath(os.path.expanduser(flat[k])) for k in PATH_FIELDS if flat[k] is not None}
    return config.replace(**fixed)


def validate(config: Config, *, cuda_available: bool | None = None, check_paths: bool = True) -> Config:
    """Check every rule; return the config with derived facts (``vocab_size``, ``world_size``) and the OPD plan
    (``config.plan``). Starts nothing.

    ``check_paths=False`` skips the checks of files that do not exist yet (the built-in experiment validates the
    user's flags before it trains the models those paths will hold).
    """
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    config = _absolute_paths(config)
    derived = dict(config.derived)
    if config.model.hf_checkpoint and os.path.isfile(os.path.join(config.model.hf_checkpoint, "config.json")):
        hf_config = hf.read_config(config.model.hf_checkpoint)
        derived.setdefault("vocab_size", hf_config.get("vocab_size"))
        derived.setdefault("model_params", hf.approx_params(hf_config))
    world = config.train.actor_num_nodes * config.train.actor_num_gpus_per_node
    derived["world_size"] = world
    derived["check_paths"] = check_paths
    config = dataclasses.replace(config, derived=derived)
    _validate_paths_and_devices(config, cuda_available, check_paths)
    plan = _validate_opd(config)
    _validate_rewards(config)
    _validate_algo(config)
    _validate_batches(config, world)
    return dataclasses.replace(config, plan=plan)


def notices(config: Config) -> list[str]:
    """Settings that are valid but likely to hurt, one line each (printed before the run starts)."""
    out = []
    t = config.train
    if t.lr_warmup_iters == 0 and t.lr >= 1e-4:
        out.append(f"--lr {t.lr:g} with no --lr-warmup-iters: a fresh Adam state moves every weight by ~lr in its "
                   "first steps whatever the gradient's size; on a fine-tuned model that can undo it in one step "
                   "(measured: 52% -> 12% accuracy, README). Consider --lr-warmup-iters 20 or more.")
    return out
