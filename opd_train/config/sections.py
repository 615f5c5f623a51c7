"""The typed sections of the run configuration (one frozen dataclass per concern) and the :class:`Config`.

Each field's ``--help`` text lives in its metadata (:func:`opt`); the command line is generated from these fields
(:mod:`.parsing`), so the attribute names are the flag names (slime's).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from ..types import (ESTIMATORS, KL_ESTIMATORS, OPD_KL_MODES, TEACHER_CONCURRENCY, TEACHER_MAX_RETRIES,
                     TEACHER_TIMEOUT)
from .plan import OPDPlan

REWARD_NAMES = ("exact_match", "math")
OPD_REWARD_FUNC = "opd_train.rollout.on_policy_distillation.reward_func"
OPD_POST_PROCESS = "opd_train.rollout.on_policy_distillation.post_process_rewards"


class ConfigError(ValueError):
    """An invalid flag or flag combination (raised before anything starts)."""


def opt(default: Any, help: str, *, choices: tuple | None = None, metavar: str | None = None) -> Any:
    """A config field with its ``--help`` text (and choices) in the metadata; argparse is built from these."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


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
    eval_prompt_data: str | None = opt(None, "held-out prompts (.jsonl/.parquet) for pass@1 (slime's NAME FILE also "
                                             "works)", metavar="FILE")
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
    opd_kl_mode: str = opt("sampled", "sampled: the sampled-token estimator (--opd-kl-estimator) penalises the "
                                      "advantage, slime's objective; full: the exact full-vocabulary reverse KL as a "
                                      "loss term; topk: the KL over the SGLang teacher's top-K (--opd-teacher-topk) "
                                      "plus a tail bucket, a loss term (a lower bound of the exact KL)",
                           choices=OPD_KL_MODES)
    opd_kl_estimator: str | None = opt(None, "sampled-token estimator of d = lp_S - lp_T (default k1). What each "
                                             "optimises as an advantage penalty (expected policy gradient): k1 = d "
                                             "-> grad KL(S||T), the reverse KL; k2 = d^2/2 -> grad (E_S[d^2/2] - "
                                             "KL(S||T)), which vanishes to second order near the teacher; k3 = "
                                             "exp(-d) - 1 + d -> grad KL(S||T) - grad KL(T||S)",
                                       choices=KL_ESTIMATORS)
    opd_teacher_topk: int | None = opt(None, "--opd-kl-mode topk: teacher log-probs per response position (K >= 1, "
                                             "fewer than the vocabulary)")
    opd_teacher_load: str | None = opt(None, "Megatron teacher checkpoint (torch_dist) or HF dir; megatron only")
    opd_teacher_ckpt_step: int | None = opt(None, "teacher checkpoint iteration (default: the latest)")
    offload_teacher: bool = opt(False, "keep the Megatron teacher's weights on CPU between uses (GPU)")
    opd_task_rm_path: str | None = opt(None, "sglang mode: dotted task reward combined with OPD (default: the "
                                             "--rm-type reward, else pure distillation)")
    opd_teacher_timeout: float = opt(TEACHER_TIMEOUT, "seconds per teacher request attempt")
    opd_teacher_max_retries: int = opt(TEACHER_MAX_RETRIES, "teacher retries (exponential backoff) before the run "
                                                            "stops")
    opd_teacher_concurrency: int = opt(TEACHER_CONCURRENCY, "teacher requests in flight at most")


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
    kl_loss_type: str = opt("k3", "reference-KL loss estimator (low_var_kl: slime's name for k3 clamped to "
                                  "[-10, 10])", choices=("k1", "k2", "k3", "low_var_kl"))
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
    only_train_params_name_list: tuple[str, ...] | None = opt(
        None, "train only the parameters whose Megatron name matches one of these regexes (re.search), freeze the "
              "rest (slime's flag)", metavar="REGEX")
    freeze_params_name_list: tuple[str, ...] | None = opt(
        None, "freeze the parameters whose Megatron name matches one of these regexes, e.g. 'embedding' (the "
              "tied embedding and output layer) (slime's flag)", metavar="REGEX")
    fused_output_layer: bool = opt(True, "output layer + log-probs / entropy / KL fused and chunked over tokens "
                                         "(no [tokens, vocab] logits or gradient); --no-fused-output-layer "
                                         "materialises the logits (same results)")
    fused_linear_chunk_tokens: int | None = opt(None, "token rows per chunk of the fused output layer (default: "
                                                      "the most with rows * vocab / TP * 4 bytes <= 64 MiB)")


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
    trainer_threads: int | None = opt(None, "torch threads of each trainer rank (default: on CPU for a model of 20M+ "
                                            "parameters, this machine's cores / the trainer ranks; else Ray's 1)")


@dataclass(frozen=True)
class LogConfig:
    """Observability."""
    output_dir: str = opt("runs/opd", "run directory: metrics.jsonl, TensorBoard events, curves.png, "
                                      "results.json")
    no_tensorboard: bool = opt(False, "do not write TensorBoard events")
    no_progress: bool = opt(False, "no progress bar")
    verbose: bool = opt(False, "show everything on the terminal: Ray workers' output, Megatron's notices, third-party "
                               "warnings (by default they go to OUTPUT_DIR/logs/)")


@dataclass(frozen=True)
class ExperimentConfig:
    """The built-in CPU experiments (used when --hf-checkpoint is not given)."""
    experiment: str = opt("addition", "which: addition (the toy task: tiny SFT models, three runs and a table) or "
                                      "smollm2 (prune SmolLM2-135M-Instruct and heal it by OPD, both teacher modes)",
                          choices=("addition", "smollm2"))
    experiment_cache_dir: str = opt("~/.cache/opd-train/toy", "where the models are cached (smollm2: in its "
                                                              "smollm2/ folder)")
    experiment_baseline: bool = opt(True, "also run reward-only GRPO with the same budget (--no-experiment-"
                                          "baseline skips it)")
    experiment_baseline_lr: float = opt(3e-4, "learning rate of the GRPO baseline (its best stable value)")
    experiment_fast: bool = opt(False, "a shortened run for tests (fewer steps and prompts)")
    experiment_seed: int = opt(0, "seed of the whole experiment (SFT of both models, rollouts, minibatches)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "reward": RewardConfig,
            "opd": OPDConfig, "algo": AlgoConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
            "cluster": ClusterConfig, "log": LogConfig, "experiment": ExperimentConfig}
FIELD_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELD_SECTION), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see opd-train --help"
    return f"unknown config key {key!r}{hint}"


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
    # How OPD runs (None without --use-opd), resolved once by validate() and read everywhere else.
    plan: OPDPlan | None = None

    @property
    def args(self) -> ArgsView:
        """slime-style flat attributes (plus derived facts such as ``vocab_size``) for reward functions; the SGLang
        teacher hook reads the plan's request size as ``opd_teacher_topk``."""
        extra = dict(self.derived)
        if self.plan is not None:
            extra["opd_teacher_topk"] = self.plan.teacher_topk
        return ArgsView(self, extra)

    @property
    def save_dir(self) -> str:
        """Where checkpoints go: ``--save``, else ``OUTPUT_DIR/checkpoints`` (the teacher-failure checkpoint)."""
        import os
        return self.checkpoint.save or os.path.join(self.log.output_dir, "checkpoints")

    def args_with(self, **extra: Any) -> ArgsView:
        """:attr:`args` with extra (derived) attributes, e.g. the task reward handed to the OPD hook."""
        view = self.args
        return ArgsView(self, {**view._extra, **{k: v for k, v in extra.items() if v is not None}})

    def replace(self, **values: Any) -> "Config":
        """A copy with flat flag values replaced (``cfg.replace(lr=1e-3, use_opd=True)``); validate it again."""
        by_section: dict[str, dict] = {}
        for key, value in values.items():
            if key not in FIELD_SECTION:
                raise ConfigError(unknown_key_message(key))
            by_section.setdefault(FIELD_SECTION[key], {})[key] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v)
                                            for s, v in by_section.items()})

    def to_flat_dict(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, s), f.name) for s, cls in SECTIONS.items() for f in fields(cls)}


