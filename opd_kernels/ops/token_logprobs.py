"""log p(token | logits / T) (and the entropy of p) per row, fused over the vocabulary.

SKELETON: the public function runs the PyTorch reference until the kernels land (issue 2).
"""
from __future__ import annotations

import torch


def token_logprobs_reference(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                             return_entropy: bool = False, ignore_index: int = -100):
    """Plain PyTorch: the oracle (pass float64 logits) and the benchmark baseline. Computes in at least fp32."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def token_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, ignore_index=-100,
                   process_group=None):
    if process_group is not None:
        raise NotImplementedError("tensor-parallel token_logprobs lands with the kernels (issue 2)")
    out = token_logprobs_reference(logits, tokens, temperature=temperature, return_entropy=return_entropy,
                                   ignore_index=ignore_index)
    return tuple(o.float() for o in out) if return_entropy else out.float()
