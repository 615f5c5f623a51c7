"""Typed settings of the Megatron backend: one small frozen dataclass per concern, validated on construction.

Every class checks its own fields in ``__post_init__`` and raises ``ValueError`` naming the field and the fix,
so a bad setting fails before any process group, model or checkpoint is touched. Cross-section rules (for
example "a critic needs a value-loss clip") live in :meth:`TrainerSettings.__post_init__`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["fp32", "bf16"]
_DTYPES = ("fp32", "bf16")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _positive_int(value, name: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's architecture and initial weights come from (exactly one of the three).

    hf_path: a HuggingFace directory (config.json + *.safetensors; tokenizer files are carried to exports).
    checkpoint: a torch_dist checkpoint directory of ours (``iter_NNNNNNN/`` + tracker file); the architecture
        is read from the HF config stored inside it. ``step`` picks the iteration (default: the latest).
    hf_config: a HF config as a dict (what config.json holds): random initialisation (tests, toy runs).
    """
    hf_path: str | None = None
    checkpoint: str | None = None
    step: int | None = None
    hf_config: dict | None = None

    def __post_init__(self):
        given = [n for n in ("hf_path", "checkpoint", "hf_config") if getattr(self, n) is not None]
        _require(len(given) == 1, "ModelSource needs exactly one of hf_path=, checkpoint=, hf_config= "
                                  f"(got {given or 'none'})")
        for name in ("hf_path", "checkpoint"):
            path = getattr(self, name)
            _require(path is None or os.path.isdir(path),
                     f"ModelSource.{name}={path!r} is not a directory; pass an existing path")
        _require(self.step is None or self.checkpoint is not None,
                 "ModelSource.step selects a checkpoint iteration: it needs checkpoint=")
        _require(self.step is None or (isinstance(self.step, int) and self.step >= 0),
                 f"ModelSource.step must be a non-negative int, got {self.step!r}")
        _require(self.hf_config is None or isinstance(self.hf_config, dict),
                 "ModelSource.hf_config must be a dict (e.g. transformers_config.to_dict())")


@dataclass(frozen=True)
class ParallelSettings:
    """Tensor parallel size; data parallel size is world_size / tensor_parallel (derived at init)."""
    tensor_parallel: int = 1

    def __post_init__(self):
        _positive_int(self.tensor_parallel, "ParallelSettings.tensor_parallel")


@dataclass(frozen=True)
class OptimizerSettings:
    """Megatron's Adam (``get_megatron_optimizer``) with grad clipping and a warmup/decay schedule."""
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None          # None: constant lr after warmup
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0                      # max global grad norm; 0 disables clipping
    use_distributed_optimizer: bool = True      # shard optimizer state over data-parallel ranks
    only_train: tuple[str, ...] | None = None   # regexes of the parameter names to train (None: all), then
    freeze: tuple[str, ...] = ()                # regexes of those to freeze (slime's two name lists)

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                     f"OptimizerSettings.{name} must be a finite number >= 0, got {value!r}")
        _require(self.lr > 0, "OptimizerSettings.lr must be > 0")
        _require(self.min_lr <= self.lr, f"OptimizerSettings.min_lr={self.min_lr} exceeds lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, f"OptimizerSettings.{name} must be in [0, 1)")
        _require(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0,
                 "OptimizerSettings.lr_warmup_steps must be an int >= 0")
        names = lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v)  # noqa: E731
        _require((self.only_train is None or names(self.only_train)) and names(self.freeze),
                 "OptimizerSettings.only_train (or None) and .freeze must be tuples of regex strings")
        _require(self.lr_decay_style in ("constant", "linear", "cosine"),
                 f"OptimizerSettings.lr_decay_style={self.lr_decay_style!r}: use constant, linear or cosine")
        _require(self.lr_decay_style == "constant" or self.lr_decay_steps is not None,
                 f"lr_decay_style={self.lr_decay_style!r} needs OptimizerSettings.lr_decay_steps")
        _require(self.lr_decay_steps is None or self.lr_decay_steps > self.lr_warmup_steps,
                 "OptimizerSettings.lr_decay_steps must exceed lr_warmup_steps")


@dataclass(frozen=True)
class PrecisionSettings:
    """Parameter/compute dtype. bf16 keeps fp32 master weights in the optimizer (Megatron's mixed precision)."""
    dtype: Dtype = "fp32"

    def __post_init__(self):
        _require(self.dtype in _DTYPES, f"PrecisionSettings.dtype={self.dtype!r}: use one of {_DTYPES}")


@dataclass(frozen=True)
class CheckpointSettings:
    """``--load/--save/--save-interval``: resume from ``load`` when it holds a checkpoint; save every N steps.

    no_load_optim: resume the weights and step but start a fresh optimizer (e.g. after changing TP/DP: the
    optimizer state is stored in Megatron's ``dp_reshardable`` layout, which needs the same TP x DP layout).
    """
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False

    def __post_init__(self):
        _require(self.save_interval is None or (isinstance(self.save_interval, int) and self.save_interval >= 1),
                 f"CheckpointSettings.save_interval must be a positive int, got {self.save_interval!r}")
        _require(self.save_interval is None or self.save is not None,
                 "CheckpointSettings.save_interval needs save= (the directory to save into)")


@dataclass(frozen=True)
class BatchingSettings:
    """Packing of variable-length samples into micro-batches.

    max_tokens_per_microbatch: token budget of one packed micro-batch (a sample longer than the budget gets a
    micro-batch of its own). The attention cost on CPU is O(budget^2) per head, so keep it modest there.
    fused_output_layer: True (default): the models return their final hidden states and the log-probs, entropy and
    KL come from ``opd_kernels.fused_linear_logprobs`` / ``fused_linear_opd_advantages`` (output layer + loss
    chunked over tokens: no [S, V] logits). False: the materialised path (Megatron's output layer, [S, V / TP]
    logits, then the row ops); same results, kept for comparison and debugging.
    fused_linear_chunk_tokens: token rows per chunk of the fused path; None = the op's default budget (the most
    rows with rows * V / TP * 4 bytes <= 64 MiB).
    """
    max_tokens_per_microbatch: int = 4096
    fused_output_layer: bool = True
    fused_linear_chunk_tokens: int | None = None

    def __post_init__(self):
        _positive_int(self.max_tokens_per_microbatch, "BatchingSettings.max_tokens_per_microbatch")
        _require(isinstance(self.fused_output_layer, bool), "BatchingSettings.fused_output_layer must be a bool")
        if self.fused_linear_chunk_tokens is not None:
            _positive_int(self.fused_linear_chunk_tokens, "BatchingSettings.fused_linear_chunk_tokens")


@dataclass(frozen=True)
class TeacherSettings:
    """Megatron teacher mode (``--opd-teacher-load DIR [--opd-teacher-ckpt-step N] [--offload-teacher]``)."""
    load: str
    step: int | None = None
    offload: bool = False

    def __post_init__(self):
        _require(isinstance(self.load, str) and os.path.isdir(self.load),
                 f"TeacherSettings.load={self.load!r} (--opd-teacher-load) is not a directory; pass the "
                 "teacher's torch_dist checkpoint dir (tools/convert_hf_to_torch_dist.py makes one)")
        _require(self.step is None or (isinstance(self.step, int) and self.step >= 0),
                 f"TeacherSettings.step (--opd-teacher-ckpt-step) must be an int >= 0, got {self.step!r}")


@dataclass(frozen=True)
class OPDSettings:
    """On-policy distillation in the trainer (the driver's OPD plan, as the trainer needs it).

    estimator: "k1" | "k2" | "k3": the KL term is that sampled-token estimator of d = lp_S - lp_T (the teacher's
        log-prob of each sampled token: from the SGLang teacher's scores, or the Megatron teacher's logits);
        None: the KL from the teacher's distribution (the Megatron teacher's logits: exact; an SGLang teacher's
        top-K: the top-K + tail-bucket KL, exact for K = V).
    advantage_coef: the forward returns A' = A - advantage_coef * KL_t (slime's objective for the estimators).
    loss_coef: the train step adds loss_coef * reduce(KL_t) to the loss, differentiated through the fused kernel.
    """
    estimator: str | None = "k1"
    advantage_coef: float = 1.0
    loss_coef: float = 0.0

    def __post_init__(self):
        _require(self.estimator in (None, "k1", "k2", "k3"),
                 f"OPDSettings.estimator={self.estimator!r}: use k1, k2, k3 or None (the teacher's distribution)")
        for name in ("advantage_coef", "loss_coef"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                     f"OPDSettings.{name} must be a finite number >= 0, got {value!r}")
        _require(self.loss_coef == 0 or self.estimator is None,
                 "OPDSettings.loss_coef needs estimator=None: a sampled-token estimator is an advantage penalty")


@dataclass(frozen=True)
class CriticSettings:
    """PPO critic: a GPT trunk (initialised from ``source``) with a scalar value head, and its own optimizer."""
    source: ModelSource
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)


@dataclass(frozen=True)
class TrainerSettings:
    """Everything :class:`~opd_train.backends.megatron.trainer.MegatronTrainer` needs.

    temperature: log-probs (student, reference, teacher) are computed from ``logits / temperature``; set it to
    the rollout temperature (SPEC section 1).
    opd: on-policy distillation (the teacher is ``teacher``, or an SGLang teacher whose scores come with each batch).
    seed: for the caller to pass to ``init_distributed`` (it seeds torch and Megatron's RNG tracker there).
    """
    model: ModelSource
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    reference: ModelSource | None = None
    teacher: TeacherSettings | None = None
    opd: OPDSettings | None = None
    critic: CriticSettings | None = None
    temperature: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        _require(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                 and self.temperature > 0, f"TrainerSettings.temperature must be finite and > 0, "
                                           f"got {self.temperature!r}")
        _require(isinstance(self.seed, int) and self.seed >= 0, "TrainerSettings.seed must be an int >= 0")


@dataclass(frozen=True)
class LossSettings:
    """Policy-loss options forwarded to ``opd_train.algo.policy_loss`` (names match its keyword arguments)."""
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    dual_clip: float | None = None
    sequence_level_ratio: bool = False          # GSPO
    reduction: Literal["sample_mean", "token_mean"] = "sample_mean"
    entropy_coef: float = 0.0
    ref_kl_coef: float = 0.0
    ref_kl: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    value_clip: float | None = 0.2              # critic: clip of (V - V_old) in the value loss

    def __post_init__(self):
        _require(self.reduction in ("sample_mean", "token_mean"),
                 f"LossSettings.reduction={self.reduction!r}: use sample_mean or token_mean")
        _require(self.ref_kl in ("k1", "k2", "k3", "low_var_kl"),
                 f"LossSettings.ref_kl={self.ref_kl!r}: use k1, k2, k3 or low_var_kl")
        _require(self.eps_clip >= 0, "LossSettings.eps_clip must be >= 0")
        _require(self.dual_clip is None or self.dual_clip > 1.0, "LossSettings.dual_clip must be > 1 when set")
