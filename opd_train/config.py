"""Typed configuration of ``opd-train``: one frozen dataclass per concern, one ``validate()`` for every cross-flag rule.

Flags are generated from the dataclass fields (flag ``--foo-bar`` <-> field ``foo_bar``), so the attribute names
are slime's (``use_opd``, ``opd_type``, ``rm_url``, ``n_samples_per_prompt``, ...). ``Config.args`` is a read-only
flat view with those names: it is what slime-style reward functions receive as ``args``.

Precedence: dataclass default < ``--config FILE.yaml`` < command-line flag. The YAML file holds flag names (dashes
or underscores), flat or nested under section names (``opd:``, ``rollout:``, ...). Unknown keys are errors.

Validation (:func:`validate`) runs before anything is started (no Ray, no server, no model): each invalid combination
raises :class:`ConfigError` with one message naming the flag and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any

ESTIMATORS = ("grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
GROUP_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")   # need >= 2 samples per prompt
REWARD_NAMES = ("exact_match", "math")
# Above this vocabulary size the teacher's full distribution over HTTP (top_logprobs_num = V per response token)
# is refused: at V = 151936 one 1k-token response would be ~150M JSON numbers.
MAX_FULL_KL_HTTP_VOCAB = 4096
OPD_REWARD_FUNC = "opd_train.rollout.on_policy_distillation.reward_func"
OPD_POST_PROCESS = "opd_train.rollout.on_policy_distillation.post_process_rewards"


class ConfigError(ValueError):
    """An invalid flag or flag combination (raised before anything starts)."""


def opt(default: Any, help: str, *, choices: tuple | None = None, metavar: str | None = None) -> Any:
    """A config field with its ``--help`` text (and choices) in the metadata; argparse is built from these."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


# ---------------------------------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class ModelConfig:
    """The student (and optional reference) model."""
    hf_checkpoint: str | None = opt(None, "student HF directory (config.json + safetensors + tokenizer); without "
                                          "it, opd-train runs the built-in CPU experiment")
    ref_load: str | None = opt(None, "reference model (HF dir or torch_dist checkpoint) for --kl-coef / "
                                     "--use-kl-loss (default: the student's initial weights)")
    critic_load: str | None = opt(None, "critic initialisation for --advantage-estimator ppo (default: the "
                                        "student's HF checkpoint)")
    bf16: bool = opt(False, "train in bf16 with fp32 master weights (GPU); default fp32")


@dataclass(frozen=True)
class DataConfig:
    """Prompts and evaluation."""
    prompt_data: str | None = opt(None, "training prompts: a .jsonl or .parquet file", metavar="FILE")
    input_key: str = opt("prompt", "column holding the prompt (text, or a chat message list)")
    label_key: str | None = opt("label", "column holding the ground truth for task rewards (None: no labels)")
    apply_chat_template: bool = opt(False, "format prompts with the tokenizer's chat template")
    rollout_shuffle: bool = opt(False, "shuffle the prompts every epoch (seeded by --rollout-seed)")
    eval_prompt_data: str | None = opt(None, "held-out prompts (.jsonl/.parquet) for pass@1", metavar="FILE")
    eval_interval: int | None = opt(None, "evaluate every N rollout steps (and at the end)")
    n_samples_per_eval_prompt: int = opt(1, "samples per eval prompt (pass@1 = mean over them)")
    eval_temperature: float = opt(0.0, "eval sampling temperature (0 = greedy)")
    eval_max_response_len: int | None = opt(None, "eval max new tokens (default: --rollout-max-response-len)")
    eval_max_prompts: int | None = opt(None, "evaluate on the first N eval prompts only")


@dataclass(frozen=True)
class RolloutConfig:
    """Student generation."""
    rollout_batch_size: int = opt(32, "prompts per rollout step")
    n_samples_per_prompt: int = opt(4, "samples per prompt (a GRPO group)")
    num_rollout: int = opt(100, "rollout steps (each: generate -> score -> train -> sync weights)")
    rollout_temperature: float = opt(1.0, "sampling temperature; log-probs are of logits / T (SPEC section 1)")
    rollout_top_p: float = opt(1.0, "nucleus sampling (1 = off)")
    rollout_top_k: int = opt(-1, "top-k sampling (-1 = off)")
    rollout_max_response_len: int = opt(1024, "max new tokens per sample")
    rollout_stop_token_ids: str | None = opt(None, "comma-separated extra stop token ids (EOS always stops)")
    rollout_seed: int = opt(42, "seed of prompt order and sampling")
    rollout_engine: str = opt("auto", "student engine: cpu (our SGLang-protocol engine), sglang (GPU), auto "
                                      "(sglang when CUDA is present, else cpu)", choices=("auto", "cpu", "sglang"))
    rollout_num_engines: int = opt(1, "number of student engine servers (samples are spread over them)")
    rollout_num_gpus_per_engine: int = opt(1, "GPUs per SGLang engine (its --tp)")
    sglang_extra_args: str | None = opt(None, "extra sglang.launch_server arguments, passed through untouched")


@dataclass(frozen=True)
class RewardConfig:
    """Task rewards."""
    rm_type: str | None = opt(None, "built-in task reward: exact_match (answer == label) or math (\\boxed{} "
                                    "extraction + normalisation)", choices=REWARD_NAMES)
    custom_rm_path: str | None = opt(None, "dotted module.function reward (async or sync (args, sample))")
    custom_reward_post_process_path: str | None = opt(None, "dotted module.function (args, samples) -> "
                                                           "(raw_rewards, rewards)")
    rm_url: str | None = opt(None, "teacher endpoint for --opd-type sglang, e.g. http://host:port/generate")
    reward_key: str | None = opt(None, "key of the scalar reward when the reward function returns a dict")
    eval_rm_type: str | None = opt(None, "reward of evaluation (pass@1) and of the logged rollout accuracy "
                                         "(default: --rm-type)", choices=REWARD_NAMES)


@dataclass(frozen=True)
class OPDConfig:
    """On-policy distillation: A'_t = A_t - opd_kl_coef * KL_t (SPEC section 1)."""
    use_opd: bool = opt(False, "enable on-policy distillation (master switch)")
    opd_type: str | None = opt(None, "where the teacher runs: sglang (HTTP server, --rm-url) or megatron "
                                     "(in the trainer, --opd-teacher-load)", choices=("sglang", "megatron"))
    opd_kl_coef: float = opt(1.0, "OPD penalty coefficient lambda (finite, >= 0)")
    opd_kl_mode: str = opt("sampled", "sampled: estimator of the sampled token (--opd-kl-estimator); full: the "
                                      "exact full-vocabulary reverse KL", choices=("sampled", "full"))
    opd_kl_estimator: str | None = opt(None, "sampled-token estimator (default k1)", choices=("k1", "k2", "k3"))
    opd_teacher_load: str | None = opt(None, "Megatron teacher checkpoint (torch_dist) or HF dir; megatron only")
    opd_teacher_ckpt_step: int | None = opt(None, "teacher checkpoint iteration (default: the latest)")
    offload_teacher: bool = opt(False, "keep the Megatron teacher's weights on CPU between uses (GPU)")
    opd_task_rm_path: str | None = opt(None, "sglang mode: dotted task reward combined with OPD (default: the "
                                             "--rm-type reward, else pure distillation)")
    opd_teacher_timeout: float = opt(60.0, "seconds per teacher request attempt")
    opd_teacher_max_retries: int = opt(5, "teacher retries (exponential backoff) before the run stops")
    opd_teacher_concurrency: int = opt(64, "teacher requests in flight at most")


@dataclass(frozen=True)
class AlgoConfig:
    """Advantage estimator and policy loss."""
    advantage_estimator: str = opt("grpo", "base estimator OPD is applied on", choices=ESTIMATORS)
    normalize_advantages: bool = opt(False, "whiten advantages over the global batch (always on for "
                                            "reinforce_plus_plus*)")
    disable_grpo_std_normalization: bool = opt(False, "GRPO: subtract the group mean only")
    disable_rewards_normalization: bool = opt(False, "GRPO: use raw rewards (no group normalisation)")
    gamma: float = opt(1.0, "discount (ppo, reinforce_plus_plus)")
    lambd: float = opt(1.0, "GAE lambda (ppo)")
    kl_coef: float = opt(0.0, "reference-KL reward penalty (ppo, reinforce_plus_plus*)")
    use_kl_loss: bool = opt(False, "add a reference-KL loss term")
    kl_loss_coef: float = opt(0.0, "coefficient of the reference-KL loss")
    kl_loss_type: str = opt("k3", "reference-KL loss estimator", choices=("k1", "k2", "k3"))
    eps_clip: float = opt(0.2, "PPO clip epsilon")
    eps_clip_high: float | None = opt(None, "upper clip epsilon (default: --eps-clip)")
    eps_clip_c: float | None = opt(None, "dual-clip constant (> 1)")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    calculate_per_token_loss: bool = opt(False, "token-sum loss over all tokens (default: per-sample mean)")
    value_clip: float = opt(0.2, "critic value-loss clip (ppo)")
    critic_lr: float | None = opt(None, "critic learning rate (default: --lr)")


@dataclass(frozen=True)
class TrainConfig:
    """Trainer (Megatron-core) optimisation and parallelism."""
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: one step per rollout); "
                                              "rollout_batch_size * n_samples_per_prompt must be a multiple")
    lr: float = opt(1e-6, "learning rate")
    min_lr: float = opt(0.0, "minimum learning rate of the decay")
    lr_decay_style: str = opt("constant", "lr schedule", choices=("constant", "linear", "cosine"))
    lr_warmup_iters: int = opt(0, "warmup optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.98, "Adam beta2")
    clip_grad: float = opt(1.0, "max global grad norm (0 = off)")
    seed: int = opt(1234, "trainer seed")
    tensor_model_parallel_size: int = opt(1, "tensor parallel size (vocabulary-parallel log-probs)")
    actor_num_nodes: int = opt(1, "nodes for trainer actors")
    actor_num_gpus_per_node: int = opt(1, "trainer processes per node (one GPU each on GPU machines; CPU "
                                          "processes otherwise); data parallel = total / TP")
    max_tokens_per_gpu: int = opt(4096, "token budget of one packed micro-batch")


@dataclass(frozen=True)
class CheckpointConfig:
    """--load/--save: resumable, atomic Megatron torch_dist checkpoints."""
    load: str | None = opt(None, "resume from this checkpoint directory when it holds one")
    save: str | None = opt(None, "checkpoint directory")
    save_interval: int | None = opt(None, "save every N rollout steps (and at the end, and on a teacher failure)")
    no_load_optim: bool = opt(False, "resume weights and step but not the optimizer state")


@dataclass(frozen=True)
class ClusterConfig:
    """Ray and devices."""
    ray_address: str | None = opt(None, "connect to an existing Ray cluster (multi-node); default: start a "
                                        "local one")
    device: str = opt("auto", "trainer device: cuda (GPU resources), cpu, auto (cuda when available)",
                      choices=("auto", "cpu", "cuda"))
    num_cpus: int | None = opt(None, "CPUs given to a local Ray cluster (default: all)")


@dataclass(frozen=True)
class LogConfig:
    """Observability."""
    output_dir: str = opt("runs/opd", "run directory: metrics.jsonl, TensorBoard events, curves.png, "
                                      "results.json")
    no_tensorboard: bool = opt(False, "do not write TensorBoard events")
    no_progress: bool = opt(False, "no progress bar")


@dataclass(frozen=True)
class ExperimentConfig:
    """The built-in CPU experiment (used when --hf-checkpoint is not given)."""
    experiment_cache_dir: str = opt("~/.cache/opd-train/toy", "where the SFT teacher/student are cached")
    experiment_baseline: bool = opt(True, "also run reward-only GRPO with the same budget (--no-experiment-"
                                          "baseline skips it)")
    experiment_baseline_lr: float = opt(3e-4, "learning rate of the GRPO baseline (its best stable value)")
    experiment_fast: bool = opt(False, "a shortened run for tests (fewer steps and prompts)")
    experiment_seed: int = opt(0, "seed of the whole experiment (SFT of both models, rollouts, minibatches)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "reward": RewardConfig,
            "opd": OPDConfig, "algo": AlgoConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
            "cluster": ClusterConfig, "log": LogConfig, "experiment": ExperimentConfig}
FIELD_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


class ArgsView:
    """Read-only flat view of a :class:`Config` with slime's attribute names (``args.rm_url``, ...)."""

    def __init__(self, config: "Config", extra: dict[str, Any] | None = None):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_extra", dict(extra or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):          # never recurse during unpickling (before _config exists)
            raise AttributeError(name)
        if name in self._extra:
            return self._extra[name]
        section = FIELD_SECTION.get(name)
        if section is None:
            raise AttributeError(f"config has no attribute {name!r}")
        return getattr(getattr(self._config, section), name)

    def __setattr__(self, name, value):
        raise AttributeError("the run configuration is frozen after validation")

    def __getstate__(self):
        return {"config": self._config, "extra": self._extra}

    def __setstate__(self, state):
        object.__setattr__(self, "_config", state["config"])
        object.__setattr__(self, "_extra", state["extra"])


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    # Facts derived at validation (not flags): the student's vocabulary size, the trainer world size.
    derived: dict = field(default_factory=dict)

    @property
    def args(self) -> ArgsView:
        """slime-style flat attributes (plus derived facts such as ``vocab_size``) for reward functions."""
        extra = dict(self.derived)
        if self.opd.use_opd and self.opd.opd_type == "sglang" and self.opd.opd_kl_mode == "full":
            extra["opd_teacher_topk"] = -1          # the teacher's full distribution (exact KL)
        return ArgsView(self, extra)

    def args_with(self, **extra: Any) -> ArgsView:
        """:attr:`args` with extra (derived) attributes, e.g. the task reward handed to the OPD hook."""
        view = self.args
        return ArgsView(self, {**view._extra, **{k: v for k, v in extra.items() if v is not None}})

    def replace(self, **values: Any) -> "Config":
        """A copy with flat flag values replaced (``cfg.replace(lr=1e-3, use_opd=True)``); validate it again."""
        by_section: dict[str, dict] = {}
        for key, value in values.items():
            if key not in FIELD_SECTION:
                raise ConfigError(_unknown_key_message(key))
            by_section.setdefault(FIELD_SECTION[key], {})[key] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v)
                                            for s, v in by_section.items()})

    def to_flat_dict(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, s), f.name) for s, cls in SECTIONS.items() for f in fields(cls)}


# ----------------------------------------------------------------------------------------------- parsing

def _field_type(cls, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every config flag to ``parser`` with default SUPPRESS (so only explicitly given flags are present)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of flag values (flags given on the command line win)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip().splitlines()[0]})")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta, typ = f.metadata, _field_type(cls, f.name)
            help_text = f"{meta['help']} (default: {f.default})"
            if typ is bool:
                # "--no-x" fields (slime's --no-load-optim, ...) are plain switches: argparse's BooleanOptionalAction
                # would read a "--no-" prefix as "False".
                action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
                group.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
                continue
            conv = {int: int, float: float, str: str}[typ]
            group.add_argument(flag, type=conv, default=argparse.SUPPRESS, choices=meta["choices"],
                               metavar=meta["metavar"], help=help_text)


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELD_SECTION), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see opd-train --help"
    return f"unknown config key {key!r}{hint}"


def load_yaml(path: str) -> dict[str, Any]:
    """Flat ``{field: value}`` from a YAML file (flat or nested under section names)."""
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: file not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of flag names to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                sub = str(sub).replace("-", "_")
                if FIELD_SECTION.get(sub) != key:
                    raise ConfigError(f"--config {path!r}: {_unknown_key_message(sub)} (in section {key!r})")
                flat[sub] = v
        elif key in FIELD_SECTION:
            flat[key] = value
        else:
            raise ConfigError(f"--config {path!r}: {_unknown_key_message(key)}")
    return flat


def _coerce(key: str, value: Any) -> Any:
    """Type-check a YAML value against its field (ints are accepted for floats)."""
    cls = SECTIONS[FIELD_SECTION[key]]
    typ = _field_type(cls, key)
    if value is None:
        return None
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)          # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"--{key.replace('_', '-')} must be of type {typ.__name__}, got {value!r}")
    return value


def build_config(values: dict[str, Any], defaults: dict[str, Any] | None = None) -> Config:
    """A :class:`Config` from flat values over (optional) flat defaults; not validated yet."""
    merged = {**(defaults or {}), **values}
    by_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in merged.items():
        if key not in FIELD_SECTION:
            raise ConfigError(_unknown_key_message(key))
        by_section[FIELD_SECTION[key]][key] = _coerce(key, value)
    return Config(**{name: SECTIONS[name](**kw) for name, kw in by_section.items()})


def explicit_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """Flat values given explicitly: the YAML file's, overridden by command-line flags."""
    given = dict(vars(namespace))
    path = given.pop("config", None)
    given.pop("command", None)
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in given.items() if k in FIELD_SECTION})
    return values


# -------------------------------------------------------------------------------------------- validation

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


def _read_hf_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


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


def _tokenizer_vocab(directory: str) -> dict | None:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("model", {}).get("vocab")


def _validate_opd(c: Config) -> None:
    o, r = c.opd, c.reward
    if not o.use_opd:
        for flag, value in (("--opd-type", o.opd_type), ("--opd-teacher-load", o.opd_teacher_load),
                            ("--opd-teacher-ckpt-step", o.opd_teacher_ckpt_step)):
            if value is not None:
                _fail(f"{flag} is set but --use-opd is not; add --use-opd or drop {flag}")
        if r.rm_url is not None:
            _fail("--rm-url is the SGLang teacher endpoint of OPD; add --use-opd --opd-type sglang or drop --rm-url")
        return
    if o.opd_type is None:
        _fail("--use-opd needs --opd-type: sglang (teacher on an HTTP server, with --rm-url) or megatron "
              "(teacher checkpoint in the trainer, with --opd-teacher-load)")
    if not (isinstance(o.opd_kl_coef, (int, float)) and math.isfinite(o.opd_kl_coef) and o.opd_kl_coef >= 0):
        _fail(f"--opd-kl-coef must be a finite number >= 0, got {o.opd_kl_coef}")
    if o.opd_kl_mode == "full" and o.opd_kl_estimator is not None:
        _fail("--opd-kl-estimator selects the sampled-token estimator; with --opd-kl-mode full the exact KL is used: "
              "drop one of them")
    if o.opd_type == "sglang":
        _validate_opd_sglang(c)
    else:
        _validate_opd_megatron(c)


def _validate_opd_sglang(c: Config) -> None:
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
    if c.rollout.rollout_temperature != 1.0 and o.opd_kl_mode != "full":
        _fail(f"--rollout-temperature {c.rollout.rollout_temperature}: an SGLang teacher returns log-probs at T=1 "
              "only, and comparing a T-scaled student with a T=1 teacher is wrong; use --opd-kl-mode full (the "
              "teacher's full distribution is rescaled to T exactly) or --rollout-temperature 1")
    vocab = c.derived.get("vocab_size")
    if o.opd_kl_mode == "full" and vocab is not None and vocab > MAX_FULL_KL_HTTP_VOCAB:
        _fail(f"--opd-kl-mode full in sglang mode fetches the teacher's full distribution over HTTP "
              f"(top_logprobs_num = vocab size = {vocab}); above {MAX_FULL_KL_HTTP_VOCAB} that is too large: use "
              "--opd-kl-mode sampled, or --opd-type megatron where the exact KL is computed from logits in the "
              "trainer")


def _validate_opd_megatron(c: Config) -> None:
    o, r = c.opd, c.reward
    if o.opd_teacher_ckpt_step is not None and o.opd_teacher_ckpt_step < 0:
        _fail(f"--opd-teacher-ckpt-step must be >= 0, got {o.opd_teacher_ckpt_step}")
    if o.opd_teacher_load is None:
        _fail("--opd-type megatron needs --opd-teacher-load DIR (the teacher's torch_dist checkpoint; make one "
              "with `opd-train convert hf2dist HF_DIR OUT_DIR`)")
    if not c.derived.get("check_paths", True):
        return
    if not os.path.isdir(o.opd_teacher_load):
        _fail(f"--opd-teacher-load {o.opd_teacher_load!r} does not exist; pass the teacher checkpoint directory")
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
    _check_teacher_vocab(c)


def _check_teacher_vocab(c: Config) -> None:
    student = c.model.hf_checkpoint
    if student is None or not os.path.isfile(os.path.join(student, "config.json")):
        return
    tdir = teacher_hf_dir(c.opd.opd_teacher_load, c.opd.opd_teacher_ckpt_step)
    if not os.path.isfile(os.path.join(tdir, "config.json")):
        return
    tv, sv = _read_hf_config(tdir).get("vocab_size"), _read_hf_config(student).get("vocab_size")
    if tv != sv:
        _fail(f"the teacher's vocab_size ({tv}, {tdir}) differs from the student's ({sv}, {student}); OPD compares "
              "token ids, so both must share one tokenizer")
    theirs, ours = _tokenizer_vocab(tdir), _tokenizer_vocab(student)
    if theirs is not None and ours is not None and theirs != ours:
        _fail(f"the teacher's tokenizer ({tdir}) maps tokens differently from the student's ({student}); OPD needs "
              "the same tokenizer")


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
    """Check every rule; return the config with derived facts (``vocab_size``, ``world_size``). Starts nothing.

    ``check_paths=False`` skips the checks of files that do not exist yet (the built-in experiment validates the
    user's flags before it trains the models those paths will hold).
    """
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    config = _absolute_paths(config)
    derived = dict(config.derived)
    if config.model.hf_checkpoint and os.path.isfile(os.path.join(config.model.hf_checkpoint, "config.json")):
        derived.setdefault("vocab_size", _read_hf_config(config.model.hf_checkpoint).get("vocab_size"))
    world = config.train.actor_num_nodes * config.train.actor_num_gpus_per_node
    derived["world_size"] = world
    derived["check_paths"] = check_paths
    config = dataclasses.replace(config, derived=derived)
    _validate_paths_and_devices(config, cuda_available, check_paths)
    _validate_opd(config)
    _validate_rewards(config)
    _validate_algo(config)
    _validate_batches(config, world)
    return config
