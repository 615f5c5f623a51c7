"""The teacher interface: score a finished sample's response tokens under the teacher.

A teacher returns :class:`TeacherScores` for ``tokens = prompt + response``: the teacher log-prob of every response
token (``[R]``) and, optionally, its top-k distribution at each response position (``[R, K]``; K = vocab size is
the full distribution). ``temperature`` records the temperature of those numbers (SPEC §1).

Implementations: :class:`~opd_train.teacher.sglang.SGLangTeacher` (HTTP, SGLang or our CPU engine). In Megatron
mode the teacher runs inside the trainer's forward (``opd_train.backends.megatron``), not through this interface.
"""
from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass

import torch

from ..types import Sample


@dataclass
class TeacherScores:
    logprobs: torch.Tensor                     # [R] fp32: log p_T(response[r] | prompt, response[:r])
    topk_ids: torch.Tensor | None = None        # [R, K] int64, sorted by descending teacher probability
    topk_logprobs: torch.Tensor | None = None  # [R, K] fp32
    temperature: float = 1.0                    # the temperature these log-probs are at

    def attach(self, sample: Sample) -> None:
        """Store on ``sample`` (the wire parser made them exactly the response span of this sample's request)."""
        sample.teacher_logprobs = self.logprobs
        sample.teacher_topk_ids = self.topk_ids
        sample.teacher_topk_logprobs = self.topk_logprobs
        sample.metadata["teacher_temperature"] = self.temperature


class Teacher(abc.ABC):
    @abc.abstractmethod
    async def ascore(self, tokens: list[int], response_len: int) -> TeacherScores:
        """Scores of the last ``response_len`` ids of ``tokens`` (one request)."""

    async def ascore_many(self, items: list[tuple[list[int], int]]) -> list[TeacherScores]:
        """Several sequences; implementations batch them into one request where the backend allows."""
        return list(await asyncio.gather(*(self.ascore(t, r) for t, r in items)))

    async def ascore_sample(self, sample: Sample) -> TeacherScores:
        scores = await self.ascore(sample.tokens, sample.response_length)
        scores.attach(sample)
        return scores

    async def ascore_samples(self, samples: list[Sample]) -> None:
        results = await self.ascore_many([(s.tokens, s.response_length) for s in samples])
        for sample, scores in zip(samples, results):
            scores.attach(sample)

    def close(self) -> None:
        return None
