"""slime's command line, accepted as slime's recipes write it.

slime's scripts pass Megatron's model flags (``MODEL_ARGS``) and infrastructure flags of its own stack. Here:
- model-shape flags (``--num-layers 36 --hidden-size 4096 --swiglu ...``) describe the model the HF config already
  describes: they are checked against ``config.json`` of ``--hf-checkpoint`` and a mismatch is an error naming both
  values (:func:`check_model_args`);
- flags with a meaning here are mapped: ``--kl-loss-type low_var_kl`` (k3 clamped to [-10, 10]: a choice of that
  flag), ``--eval-prompt-data NAME PATH`` (the name is dropped), ``--sglang-mem-fraction-static F`` (passed to the
  SGLang engines as ``--mem-fraction-static F``);
- infrastructure flags that do not apply are accepted with one line saying so; those whose value would change what
  runs (pipeline / context / expert parallelism > 1, dropout > 0, an optimizer other than Adam) are refused.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from .. import hf
from .sections import ConfigError

# flag -> (HF config key, type). --kv-channels is the head dim (HF: head_dim, else hidden / heads).
MODEL_VALUES = {
    "--num-layers": ("num_hidden_layers", int), "--hidden-size": ("hidden_size", int),
    "--ffn-hidden-size": ("intermediate_size", int), "--num-attention-heads": ("num_attention_heads", int),
    "--num-query-groups": ("num_key_value_heads", int), "--kv-channels": ("head_dim", int),
    "--vocab-size": ("vocab_size", int), "--norm-epsilon": ("rms_norm_eps", float),
    "--rotary-base": ("rope_theta", float), "--max-position-embeddings": ("max_position_embeddings", int),
    "--normalization": (None, str), "--position-embedding-type": (None, str),
}
# switch -> (what it claims, a check of the HF config)
MODEL_SWITCHES = {
    "--swiglu": ("a SwiGLU MLP", lambda c: c.get("hidden_act", "silu") == "silu"),
    "--group-query-attention": ("grouped-query attention", lambda c: True),
    "--use-rotary-position-embeddings": ("RoPE", lambda c: True),
    "--disable-bias-linear": ("no linear biases", lambda c: not c.get("mlp_bias", False)),
    "--add-qkv-bias": ("q/k/v biases", lambda c: c.get("model_type") == "qwen2" or c.get("attention_bias", False)),
    "--qk-layernorm": ("q/k RMSNorm", lambda c: c.get("model_type") == "qwen3"),
    "--untie-embeddings-and-output-weights": ("an untied output layer",
                                              lambda c: not c.get("tie_word_embeddings", False)),
}
IGNORED_SWITCHES = (
    "--colocate", "--use-dynamic-batch-size", "--balance-data", "--sequence-parallel",
    "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32", "--use-wandb", "--offload",
    "--no-gradient-accumulation-fusion", "--use-distributed-optimizer", "--keep-old-actor",
)
IGNORED_VALUES = (
    "--rollout-num-gpus", "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
    "--micro-batch-size", "--attention-backend", "--wandb-project", "--wandb-group", "--wandb-key",
    "--seq-length", "--transformer-impl", "--eval-top-p",
    "--sglang-router-ip", "--sglang-router-port",
)
# flags whose only supported value is the one here (anything else would change what runs)
REQUIRED = {"--pipeline-model-parallel-size": "1", "--context-parallel-size": "1",
            "--expert-model-parallel-size": "1", "--expert-tensor-parallel-size": "1",
            "--attention-dropout": "0", "--hidden-dropout": "0", "--optimizer": "adam"}
WHY_IGNORED = ("has no counterpart here (opd-train packs micro-batches by --max-tokens-per-gpu and places its own "
               "actors)")


def _dest(flag: str) -> str:
    return "slime__" + flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A "slime compatibility" group: every flag above, into ``slime__*`` attributes (absent unless given)."""
    group = parser.add_argument_group("slime compatibility (checked, mapped or ignored; see opd_train/config/slime.py)")
    for flag in (*MODEL_VALUES, *IGNORED_VALUES, *REQUIRED, "--sglang-mem-fraction-static"):
        group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, metavar="V", help=argparse.SUPPRESS)
    for flag in (*MODEL_SWITCHES, *IGNORED_SWITCHES):
        group.add_argument(flag, dest=_dest(flag), action="store_true", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


@dataclass
class SlimeArgs:
    model: dict = field(default_factory=dict)        # flag -> value (True for switches) to check against HF
    values: dict = field(default_factory=dict)       # our flag values they map to
    notices: list[str] = field(default_factory=list)  # one line per ignored flag


def take(namespace: argparse.Namespace) -> SlimeArgs:
    """Remove the ``slime__*`` attributes from ``namespace`` and say what they mean here."""
    out = SlimeArgs()
    given = {k: v for k, v in vars(namespace).items() if k.startswith("slime__")}
    for key in given:
        delattr(namespace, key)
    flags = {"--" + k[len("slime__"):].replace("_", "-"): v for k, v in given.items()}
    for flag, value in flags.items():
        if flag in MODEL_VALUES or flag in MODEL_SWITCHES:
            out.model[flag] = value
        elif flag in REQUIRED:
            if not _same(value, REQUIRED[flag]):
                raise ConfigError(f"{flag} {value}: opd-train supports only {flag} {REQUIRED[flag]}; drop the flag "
                                  "or set it to that")
            out.notices.append(f"{flag} {value}: what opd-train does anyway")
        elif flag == "--sglang-mem-fraction-static":
            out.values["sglang_extra_args"] = f"--mem-fraction-static {float(value)}"
        else:
            shown = flag if value is True else f"{flag} {value}"
            out.notices.append(f"{shown}: ignored, {WHY_IGNORED}")
    return out


def _same(value, required: str) -> bool:
    try:
        return math.isclose(float(value), float(required))
    except ValueError:
        return str(value).lower() == required


def check_model_args(model: dict, hf_dir: str | None) -> None:
    """Every model-shape flag agrees with the HF config of ``hf_dir`` (ConfigError naming both values)."""
    if not model:
        return
    if hf_dir is None:
        raise ConfigError(f"{sorted(model)[0]} describes a model (slime's MODEL_ARGS): give --hf-checkpoint, whose "
                          "config.json they are checked against")
    cfg = hf.read_config(hf_dir)
    problems = []
    for flag, value in model.items():
        if flag in MODEL_SWITCHES:
            what, ok = MODEL_SWITCHES[flag]
            if not ok(cfg):
                problems.append(f"{flag} says {what}, but {hf_dir}/config.json does not")
            continue
        key, typ = MODEL_VALUES[flag]
        if key is None:
            expected = {"--normalization": "RMSNorm", "--position-embedding-type": "rope"}[flag]
            if str(value).strip('"') != expected:
                problems.append(f"{flag} {value}: opd-train's models use {expected}")
            continue
        have = cfg.get(key)
        if key == "head_dim" and have is None:
            have = cfg["hidden_size"] // cfg["num_attention_heads"]
        if key == "rope_theta" and have is None:
            have = (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_theta")
        try:
            matches = have is not None and math.isclose(typ(value), float(have), rel_tol=1e-9)
        except ValueError:
            matches = False
        if not matches:
            problems.append(f"{flag} {value} but {hf_dir}/config.json has {key} = {have}")
    if problems:
        raise ConfigError("the Megatron model flags do not describe --hf-checkpoint: " + "; ".join(problems))
