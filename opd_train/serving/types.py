"""Plain data passed between the HTTP layer, the scheduler and the model runner.

One HTTP ``/generate`` request becomes ``len(prompts) * n`` :class:`SeqRequest` (prompt-major, SGLang's output
order); each produces one :class:`SeqResult`. Nothing here knows about JSON or torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# SGLang's "whole vocabulary" top_k (``TOP_K_ALL`` in sglang/srt/sampling/sampling_params.py).
TOP_K_ALL = 1 << 30
# SGLang treats 0 <= temperature < 1e-6 as greedy: top_k 1 and temperature 1 (so greedy log-probs are raw).
SAMPLING_EPS = 1e-6


@dataclass(frozen=True)
class SamplingSpec:
    """Normalised sampling parameters of one sequence (greedy is ``top_k == 1`` with ``temperature == 1``)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()   # request stop ids; the model's EOS ids are added by the runner
    ignore_eos: bool = False                        # disables EOS *and* stop_token_ids (SGLang behaviour)
    seed: int | None = None                         # per-sequence RNG seed (derived from ``sampling_seed``)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


@dataclass
class SeqRequest:
    """One sequence to prefill (and maybe decode)."""

    input_ids: list[int]
    sampling: SamplingSpec
    return_logprob: bool = False
    logprob_start_len: int = -1          # -1: no prompt log-probs; K >= 0: entries for positions K..len-1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    prefill_key: int = -1                # sequences with the same key (the n samples of a prompt) share one prefill

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.input_ids)


@dataclass
class SeqResult:
    """What the runner computed for one :class:`SeqRequest`.

    Log-prob lists follow SGLang: ``input_*`` have one entry per prompt position from ``logprob_start_len`` on, the
    first being ``None``; ``top`` entries are ``(values, ids)`` pairs sorted by descending value.
    """

    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict = field(default_factory=dict)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    output_token_ids: list[list[float]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[tuple[list[float], list[int]] | None] = field(default_factory=list)
    input_token_ids: list[list[float] | None] = field(default_factory=list)
    cached_tokens: int = 0
    weight_version: str = "default"
