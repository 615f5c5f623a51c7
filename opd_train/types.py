"""Types and names shared by every layer of the driver (the bottom layer: imports nothing of ``opd_train``).

:class:`Sample` is the unit that flows rollout -> reward / teacher scoring -> trainer. Its field names follow slime's
``Sample`` (``tokens``, ``response_length``, ``reward``, ``label``, ``metadata``...), so reward functions written for
slime read it unchanged; log-probabilities are spelled ``*_logprobs`` as everywhere in opd (slime: ``*_log_probs``).

The name vocabularies (advantage estimators, KL estimators, OPD KL modes) and the teacher-client defaults live here
once, so the config's choices, the algorithm registry and the teacher client cannot drift apart.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

# Advantage estimators (opd_train.algo.advantages registers exactly these).
ESTIMATORS = ("grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
GROUP_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")   # normalise within a prompt's group
# Sampled-token estimators of the reverse KL (advantage penalties); "full" and "topk" are loss terms.
KL_ESTIMATORS = ("k1", "k2", "k3")
OPD_KL_MODES = ("sampled", "full", "topk")

# SGLang teacher client defaults (the --opd-teacher-* flags and SGLangTeacherConfig share them).
TEACHER_TIMEOUT = 60.0          # seconds per request attempt
TEACHER_MAX_RETRIES = 5         # retries with exponential backoff before the run stops
TEACHER_CONCURRENCY = 64        # requests in flight at most


class TeacherUnavailable(RuntimeError):
    """The SGLang teacher did not answer (before the run, or after all retries during it): the run stops with a
    resumable checkpoint and ``opd-train`` exits with status 3."""

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url, self.checkpoint, self.checkpoint_step = url, None, None

    def with_checkpoint(self, path: str, step: int) -> "TeacherUnavailable":
        self.checkpoint, self.checkpoint_step = path, step
        return self


class Status(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"   # stopped on a stop token
    TRUNCATED = "truncated"   # hit max_new_tokens
    ABORTED = "aborted"       # engine error; never trained on


@dataclass
class Sample:
    index: int = 0                        # position in the rollout batch
    group_index: int = 0                  # prompt index; the n samples of a prompt share it and are adjacent
    prompt: str = ""                      # prompt text (after any chat template)
    label: str | None = None              # ground truth for task rewards
    tokens: list[int] = field(default_factory=list)   # prompt ids + response ids
    response: str = ""                    # decoded response text
    response_length: int = 0              # number of response ids at the end of ``tokens``
    rollout_logprobs: list[float] | None = None       # engine log-probs of the response ids (at the rollout T)
    loss_mask: list[int] | None = None    # [response_length], 1 = trainable token (None = all ones)
    reward: Any = None                    # what the reward function returned (float, or dict in OPD mode)
    teacher_logprobs: torch.Tensor | None = None      # [response_length] fp32 teacher log p(response ids)
    # The teacher's top-k distribution over the response span (--opd-kl-mode topk / full in sglang mode):
    teacher_topk_ids: torch.Tensor | None = None      # [response_length, K] int64
    teacher_topk_logprobs: torch.Tensor | None = None  # [response_length, K] fp32
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.prompt_length]

    @property
    def response_ids(self) -> list[int]:
        return self.tokens[self.prompt_length:]

    def get_loss_mask(self) -> list[int]:
        return self.loss_mask if self.loss_mask is not None else [1] * self.response_length

    def get_reward_value(self, key: str | None = None) -> float:
        """The scalar task reward (``reward[key]`` when the reward is a dict)."""
        if isinstance(self.reward, dict):
            return float(self.reward[key or "reward"])
        return float(self.reward)
