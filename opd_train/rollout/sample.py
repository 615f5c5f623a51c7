"""One rollout sample: a prompt, the student's sampled response, and everything scored on it.

This is the unit that flows rollout -> reward/teacher scoring -> trainer. Field names follow slime's ``Sample``
where slime has one (``tokens``, ``response_length``, ``reward``, ``teacher_log_probs``, ...), so reward functions
written for slime read it unchanged.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


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
    rollout_log_probs: list[float] | None = None      # engine log-probs of the response ids (at the rollout T)
    loss_mask: list[int] | None = None    # [response_length], 1 = trainable token (None = all ones)
    reward: Any = None                    # what the reward function returned (float, or dict in OPD mode)
    teacher_log_probs: torch.Tensor | None = None     # [response_length] fp32 teacher log p(response ids)
    # Optional teacher top-k distribution over the response span (for --opd-kl-mode full in sglang mode):
    teacher_topk_ids: torch.Tensor | None = None      # [response_length, K] int64
    teacher_topk_log_probs: torch.Tensor | None = None  # [response_length, K] fp32
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
