"""Per-token quantities from one packed micro-batch's vocabulary-parallel logits, through ``opd_kernels``.

All functions take this rank's logits shard ``[1, S, V/TP]`` (Megatron's ``parallel_output=True``) and the
micro-batch's ``targets`` (IGNORE_INDEX off the scoring rows), and return per-row ``[S]`` fp32 tensors; rows
that are not scoring rows give 0. With TP > 1 the kernels all-reduce only per-row scalars over the TP group
(they never gather logits). Nothing of size [S, V] is allocated beyond the logits themselves; the fused path
(:func:`fused_rows`) starts from the final hidden states and allocates no [S, V] logits at all.
"""
from __future__ import annotations

import torch

import opd_kernels

from .packing import IGNORE_INDEX, MicroBatch


def _group(tp_group, tp_size: int):
    return tp_group if tp_size > 1 else None


def token_logprobs(logits: torch.Tensor, mb: MicroBatch, *, temperature: float, tp_group, tp_size: int,
                   with_entropy: bool = False):
    """log p(target | logits / T) per row (and the entropy of that distribution); differentiable."""
    return opd_kernels.token_logprobs(logits[0], mb.targets, temperature=temperature, return_entropy=with_entropy,
                                      ignore_index=IGNORE_INDEX, process_group=_group(tp_group, tp_size))


def exact_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mb: MicroBatch, *,
                     temperature: float, tp_group, tp_size: int) -> torch.Tensor:
    """Exact KL(p_student || p_teacher) over the full vocabulary at each scoring row (0 elsewhere)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's vocabulary")
    return opd_kernels.reverse_kl(student_logits[0], teacher_logits[0].detach(), temperature=temperature,
                                  mask=mb.targets != IGNORE_INDEX, process_group=_group(tp_group, tp_size))


def fused_rows(hidden: torch.Tensor, weight: torch.Tensor, mb: MicroBatch, *, temperature: float, tp_group,
               tp_size: int, chunk: int | None, with_entropy: bool = False,
               teacher: opd_kernels.LinearTeacher | opd_kernels.TopKTeacher | None = None):
    """log-probs (entropy, KL against ``teacher``) per row [S] from the final hidden states [1, S, d] and the output
    weight [V / TP, d], chunked over tokens (``opd_kernels.fused_linear_logprobs``: no [S, V] logits);
    differentiable w.r.t. both. The KL rows are the scoring rows."""
    return opd_kernels.fused_linear_logprobs(hidden[0], weight, mb.targets, temperature=temperature,
                                             return_entropy=with_entropy, ignore_index=IGNORE_INDEX, teacher=teacher,
                                             chunk_size=chunk, process_group=_group(tp_group, tp_size))


def values(output: torch.Tensor) -> torch.Tensor:
    """Critic output [1, S, 1] -> per-row values [S] (fp32)."""
    return output[0, :, 0].float()
