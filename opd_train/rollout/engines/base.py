"""The rollout-engine interface the driver codes against (same calls for SGLang on GPU and our CPU engine).

All token data is ids (no tokenizer in the engines). ``Generation.output_logprobs`` are of the temperature-scaled
sampling distribution (``log_softmax(logits / T)``, before top-k/top-p filtering), as SGLang returns them. Scoring
sequences (prompt log-probs, always at T = 1 in SGLang) is the teacher client's job: ``opd_train.teacher``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (SGLang ``sampling_params`` names; ``temperature == 0`` = greedy)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                        # -1 = whole vocabulary
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False               # also disables stop_token_ids (SGLang behaviour)
    seed: int | None = None                # ``sampling_seed``; honoured by our CPU engine, by SGLang only with
                                           # --enable-deterministic-inference

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    def to_sglang(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                               "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass
class Generation:
    """One sampled continuation."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]          # [len(output_ids)], at the sampling temperature
    finish_reason: str                    # "stop" (stop/EOS token, included in output_ids) | "length" | "abort"
    weight_version: str = "default"
    meta: dict = field(default_factory=dict)   # the raw SGLang meta_info, minus the log-prob lists


class RolloutEngine(abc.ABC):
    """An inference engine for rollouts (and, for the SGLang-protocol ones, teacher scoring)."""

    url: str | None = None

    @abc.abstractmethod
    async def agenerate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Generation]]:
        """Sample ``n`` continuations per prompt in ONE batched request; returns one list of n per prompt."""

    @abc.abstractmethod
    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        """Load new weights from an HF safetensors directory (the trainer's export). Raises on failure."""

    def update_weights_from_tensors(self, named_tensors: Mapping[str, torch.Tensor],
                                    weight_version: str | None = None) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot take weights as tensors; export an HF directory "
                                  f"and call update_weights_from_disk")

    @abc.abstractmethod
    def health(self, *, generate: bool = False) -> bool:
        """True when the server answers ``/health`` (``/health_generate`` with ``generate=True``)."""

    def flush_cache(self) -> None:  # engines without a prefix cache have nothing to flush
        return None

    def pause(self) -> None:
        return None

    def resume(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

    # Synchronous conveniences (the async methods are the primitives).
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Generation]]:
        return _run(self.agenerate(prompts, params, n))



def _run(coro):
    """Run a coroutine from synchronous code (refuses inside a running loop, where it would deadlock)."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("called a synchronous engine method inside a running event loop; await the a* method")
