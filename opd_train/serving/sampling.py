"""Batched next-token sampling with per-row temperature / top-k / top-p / min-p / seed.

Semantics follow SGLang's PyTorch sampling backend:
- the returned log-probs are ``log_softmax(logits / T)`` of the *unfiltered* distribution (what SGLang reports for
  output tokens); greedy rows (``top_k == 1``, which is how SGLang encodes ``temperature == 0``) have ``T == 1``,
  so their log-probs are raw;
- filtering keeps, in descending-probability order, the ranks ``< top_k``, the tokens whose preceding cumulative
  mass is ``<= top_p``, and the tokens with ``p >= min_p * p_max``; the kept mass is sampled from.
Sampling uses the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which draws from ``p / sum(p)`` without
renormalising; seeded rows draw ``E`` from their own generator, so a seeded sequence is reproducible whatever
batch it lands in.
"""
from __future__ import annotations

import torch

from .types import SamplingSpec


class BatchSampler:
    """Per-row sampling state for the rows of a running batch ([B] tensors; ``select`` keeps a subset)."""

    def __init__(self, specs: list[SamplingSpec], vocab_size: int, generator: torch.Generator):
        self.vocab_size = vocab_size
        self.generator = generator
        self.temps = torch.tensor([[s.temperature] for s in specs], dtype=torch.float32)        # (B, 1)
        self.top_k = torch.tensor([min(s.top_k, vocab_size) for s in specs], dtype=torch.long)   # (B,)
        self.top_p = torch.tensor([s.top_p for s in specs], dtype=torch.float32)                 # (B,)
        self.min_p = torch.tensor([s.min_p for s in specs], dtype=torch.float32)                 # (B,)
        self.greedy = torch.tensor([s.greedy for s in specs], dtype=torch.bool)                  # (B,)
        self.row_gens: list[torch.Generator | None] = []
        for s in specs:
            g = None
            if s.seed is not None and not s.greedy:
                g = torch.Generator().manual_seed(s.seed)
            self.row_gens.append(g)
        self._refresh_flags()

    def _refresh_flags(self) -> None:
        sampled = ~self.greedy
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        self.needs_filter = bool(((self.top_k < self.vocab_size) | (self.top_p < 1.0) | (self.min_p > 0.0))
                                 [sampled].any())
        self.all_unit_temp = bool((self.temps == 1.0).all())

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (int64 indices into the current batch), in that order."""
        self.temps, self.top_k = self.temps[rows], self.top_k[rows]
        self.top_p, self.min_p, self.greedy = self.top_p[rows], self.min_p[rows], self.greedy[rows]
        self.row_gens = [self.row_gens[i] for i in rows.tolist()]
        self._refresh_flags()

    def extend(self, other: "BatchSampler") -> None:
        """Append ``other``'s rows (continuous batching)."""
        self.temps = torch.cat([self.temps, other.temps])
        self.top_k, self.top_p = torch.cat([self.top_k, other.top_k]), torch.cat([self.top_p, other.top_p])
        self.min_p, self.greedy = torch.cat([self.min_p, other.min_p]), torch.cat([self.greedy, other.greedy])
        self.row_gens = self.row_gens + other.row_gens
        self._refresh_flags()

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) fp32 log-probs of the distribution SGLang reports (temperature-scaled, unfiltered)."""
        logits = logits.float()
        if not self.all_unit_temp:
            logits = logits / self.temps
        return torch.log_softmax(logits, dim=-1)

    def sample(self, logits: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) int64 from ``logits`` (B, V) and the ``logprobs`` returned by :meth:`log_probs`."""
        greedy_tokens = logits.argmax(dim=-1) if self.any_greedy else None
        if self.all_greedy:
            return greedy_tokens
        probs = logprobs.exp()
        if self.needs_filter:
            probs = self._filter(probs)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, g in enumerate(self.row_gens):
            if g is not None:
                noise[row].exponential_(generator=g)
        tokens = (probs / noise.clamp_(min=torch.finfo(probs.dtype).tiny)).argmax(dim=-1)
        if greedy_tokens is not None:
            tokens = torch.where(self.greedy, greedy_tokens, tokens)
        return tokens

    def _filter(self, probs: torch.Tensor) -> torch.Tensor:
        sorted_p, order = probs.sort(dim=-1, descending=True)                            # (B, V)
        ranks = torch.arange(probs.shape[-1]).unsqueeze(0)                                # (1, V)
        keep = ranks < self.top_k.unsqueeze(1)
        keep &= (sorted_p.cumsum(dim=-1) - sorted_p) <= self.top_p.unsqueeze(1)
        keep &= sorted_p >= self.min_p.unsqueeze(1) * sorted_p[:, :1]
        keep[:, 0] = True                                                                 # never an empty support
        mask = torch.zeros_like(keep).scatter_(1, order, keep)
        return probs * mask
