"""Typed configuration of ``opd-train``: one frozen dataclass per concern, one ``validate()`` for every cross-flag rule.

Flags are generated from the dataclass fields (flag ``--foo-bar`` <-> field ``foo_bar``), so the attribute names
are slime's (``use_opd``, ``opd_type``, ``rm_url``, ``n_samples_per_prompt``, ...). ``Config.args`` is a read-only
flat view with those names: it is what slime-style reward functions receive as ``args``.

Precedence: dataclass default < ``--config FILE.yaml`` < command-line flag. The YAML file holds flag names (dashes
or underscores), flat or nested under section names (``opd:``, ``rollout:``, ...). Unknown keys are errors.

Validation (:func:`validate`) runs before anything is started (no Ray, no server, no model): each invalid combination
raises :class:`ConfigError` with one message naming the flag and the fix.
"""
from .parsing import add_arguments, build_config, explicit_values, load_yaml
from .plan import MAX_FULL_KL_HTTP_VOCAB, OPDPlan
from .sections import (FIELD_SECTION, OPD_POST_PROCESS, OPD_REWARD_FUNC, REWARD_NAMES, SECTIONS, AlgoConfig,
                       ArgsView, CheckpointConfig, ClusterConfig, Config, ConfigError, DataConfig, ExperimentConfig,
                       LogConfig, ModelConfig, OPDConfig, RewardConfig, RolloutConfig, TrainConfig)
from .validation import notices, teacher_hf_dir, validate

__all__ = ["FIELD_SECTION", "MAX_FULL_KL_HTTP_VOCAB", "OPD_POST_PROCESS", "OPD_REWARD_FUNC", "REWARD_NAMES",
           "SECTIONS", "AlgoConfig", "ArgsView", "CheckpointConfig", "ClusterConfig", "Config", "ConfigError",
           "DataConfig", "ExperimentConfig", "LogConfig", "ModelConfig", "OPDConfig", "OPDPlan", "RewardConfig",
           "RolloutConfig", "TrainConfig", "add_arguments", "build_config", "explicit_values", "load_yaml",
           "notices", "teacher_hf_dir", "validate"]
