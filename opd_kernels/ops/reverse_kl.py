"""Exact reverse KL(p_S || p_T) per row, p = softmax(logits / T), fused over the vocabulary.

SKELETON: the public function runs the PyTorch reference until the kernels land (issue 2).
"""
from __future__ import annotations

import torch


def reverse_kl_reference(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """Plain PyTorch (two log_softmax): the oracle (pass float64) and the benchmark baseline."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    p = ls.exp()
    kl = torch.where(p > 0, p * (ls - lt), torch.zeros_like(p)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, process_group=None):
    if process_group is not None:
        raise NotImplementedError("tensor-parallel reverse_kl lands with the kernels (issue 2)")
    return reverse_kl_reference(student_logits, teacher_logits, temperature=temperature, mask=mask).float()
