"""On-policy distillation inside the trainer, per packed micro-batch: the fused forward and the KL loss term.

Forward (``MegatronTrainer.forward(batch, advantages=...)``): from the student logits it already holds, ONE call of
``opd_kernels.opd_advantages`` per micro-batch gives the old log-probs, the per-token KL term and the adjusted
advantages ``A' = A - advantage_coef * KL_t``. The teacher side is
- the Megatron teacher: its logits on the same micro-batch (sampled estimators: its token log-probs, from one
  ``token_logprobs`` pass; the distribution: the logits themselves, exact KL);
- an SGLang teacher: :class:`TeacherRows` sent with the batch (sampled estimators: its token log-probs; the
  distribution: its top-K (id, log-prob) pairs, K = V for the full distribution).
In the loss modes (``OPDSettings.estimator is None``) advantage_coef is 0: the forward still returns the KL (the
metric) and the log-probs, and the train step adds ``loss_coef * reduce(KL_t)``, differentiated through
``reverse_kl`` (Megatron teacher) or ``topk_kl`` (SGLang teacher).

Everything takes this rank's vocabulary shard [1, S, V/TP] and the TP group: logits are never gathered. The fused
path (``BatchingSettings.fused_output_layer``, the default) starts from the final hidden states and the output
weight instead (``forward_rows_fused``, ``kl_teacher``): logits exist one chunk of rows at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import opd_kernels

from .config import OPDSettings
from .packing import IGNORE_INDEX, MicroBatch, TrainBatch


@dataclass
class TeacherRows:
    """An SGLang teacher's scores of each sample's response, sent with the batch (batch order).

    logprobs: per sample [R_i] log p_T of the response tokens (always: the metric and the sampled estimators).
    topk_ids / topk_logprobs: per sample [R_i, K] the teacher's top-K at each response position (the
        distribution modes; K = V for the full distribution).
    """
    logprobs: list[torch.Tensor]
    topk_ids: list[torch.Tensor] | None = None
    topk_logprobs: list[torch.Tensor] | None = None

    def take(self, idx: list[int]) -> "TeacherRows":
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return TeacherRows(pick(self.logprobs), pick(self.topk_ids), pick(self.topk_logprobs))

    def check(self, batch: TrainBatch, opd: OPDSettings) -> None:
        """Clear ValueError on a wrong number of samples, a wrong span length or a missing top-K."""
        if opd.estimator is None and self.topk_ids is None:
            raise ValueError("OPDSettings.estimator=None (the KL from the teacher's distribution) needs the SGLang "
                             "teacher's top-K: TeacherRows(topk_ids=..., topk_logprobs=...)")
        for name in ("logprobs", "topk_ids", "topk_logprobs"):
            rows = getattr(self, name)
            if rows is None:
                continue
            if len(rows) != len(batch):
                raise ValueError(f"TeacherRows.{name} has {len(rows)} entries for {len(batch)} samples")
            for i, (t, r) in enumerate(zip(rows, batch.response_lengths)):
                if t.shape[0] != r or (name != "logprobs" and t.dim() != 2) or (name == "logprobs" and t.dim() != 1):
                    raise ValueError(f"TeacherRows.{name}[{i}] has shape {tuple(t.shape)}; the sample has {r} "
                                     f"response tokens ({'[R]' if name == 'logprobs' else '[R, K]'})")


def attach_teacher(mbs: list[MicroBatch], rows: TeacherRows | None, device) -> None:
    """Each micro-batch gets the teacher rows at its scoring rows: [S] log-probs, [S, K] top-K (id -1 elsewhere)."""
    if rows is None:
        return
    for mb in mbs:
        mb.extras["teacher_logprobs"] = mb.place(rows.logprobs, 0.0).float().to(device)
        if rows.topk_ids is not None:
            mb.extras["topk_ids"] = mb.place(rows.topk_ids, -1).long().to(device)
            mb.extras["topk_logprobs"] = mb.place(rows.topk_logprobs, 0.0).to(device)


def _group(tp_group, tp_size: int):
    return tp_group if tp_size > 1 else None


def forward_rows(mb: MicroBatch, logits: torch.Tensor, teacher_logits: torch.Tensor | None, opd: OPDSettings, *,
                 temperature: float, tp_group, tp_size: int) -> dict[str, torch.Tensor]:
    """Per-row [S] logprobs, advantages (A'), opd_kl and teacher_logprobs of one micro-batch (no gradients)."""
    group = _group(tp_group, tp_size)
    kw = dict(temperature=temperature, process_group=group)
    if teacher_logits is not None:
        teacher_logprobs = opd_kernels.token_logprobs(teacher_logits[0], mb.targets, ignore_index=IGNORE_INDEX, **kw)
        source = (dict(teacher_logits=teacher_logits[0]) if opd.estimator is None
                  else dict(teacher_logprobs=teacher_logprobs))
    else:
        teacher_logprobs = mb.extras["teacher_logprobs"]
        source = (dict(teacher_topk_ids=mb.extras["topk_ids"], teacher_topk_logprobs=mb.extras["topk_logprobs"])
                  if opd.estimator is None else dict(teacher_logprobs=teacher_logprobs))
    kind = opd.estimator or ("full" if teacher_logits is not None else "topk")
    # every response token (the loss mask applies in the loss and the metrics, as for the plain forward)
    scoring = mb.targets != IGNORE_INDEX
    out = opd_kernels.opd_advantages(logits[0], mb.targets, mb.extras["adv_rows"], kl=kind,
                                     coef=opd.advantage_coef, mask=scoring, **source, **kw)
    return {"logprobs": out.student_logprobs, "advantages": out.advantages, "opd_kl": out.kl,
            "teacher_logprobs": torch.where(scoring, teacher_logprobs, torch.zeros_like(teacher_logprobs))}


def forward_rows_fused(mb: MicroBatch, hidden: torch.Tensor, weight: torch.Tensor, teacher, opd: OPDSettings, *,
                       temperature: float, tp_group, tp_size: int, chunk: int | None) -> dict[str, torch.Tensor]:
    """:func:`forward_rows` from the final hidden states [1, S, d] and the output weight [V / TP, d], one chunk of
    rows at a time (no [S, V] logits). ``teacher``: the Megatron teacher's (hidden [1, S, d_t], weight), or None
    (an SGLang teacher's rows in ``mb.extras``)."""
    kw = dict(temperature=temperature, process_group=_group(tp_group, tp_size), chunk_size=chunk)
    teacher_logprobs, source = None, None
    if teacher is not None:
        t_hidden, t_weight = teacher[0][0], teacher[1]
        if opd.estimator is None:    # the exact KL: its chunks give the teacher's token log-probs too
            source = opd_kernels.LinearTeacher(t_hidden, t_weight)
        else:
            teacher_logprobs = opd_kernels.fused_linear_logprobs(t_hidden, t_weight, mb.targets,
                                                                 ignore_index=IGNORE_INDEX, **kw).logp
    else:
        teacher_logprobs = mb.extras["teacher_logprobs"]
        if opd.estimator is None:
            source = opd_kernels.TopKTeacher(mb.extras["topk_ids"], mb.extras["topk_logprobs"])
    kind = opd.estimator or ("full" if teacher is not None else "topk")
    scoring = mb.targets != IGNORE_INDEX
    out = opd_kernels.fused_linear_opd_advantages(hidden[0], weight, mb.targets, mb.extras["adv_rows"], kl=kind,
                                                  coef=opd.advantage_coef, mask=scoring, teacher=source,
                                                  teacher_logprobs=None if source else teacher_logprobs, **kw)
    if out.teacher_logprobs is not None:
        teacher_logprobs = out.teacher_logprobs
    return {"logprobs": out.student_logprobs, "advantages": out.advantages, "opd_kl": out.kl,
            "teacher_logprobs": torch.where(scoring, teacher_logprobs, torch.zeros_like(teacher_logprobs))}


def kl_teacher(mb: MicroBatch, teacher) -> opd_kernels.LinearTeacher | opd_kernels.TopKTeacher:
    """The KL loss's teacher for the fused path: the Megatron teacher's (hidden [1, S, d_t], weight), detached, or
    (None) the SGLang teacher's top-K rows of the micro-batch."""
    if teacher is not None:
        return opd_kernels.LinearTeacher(teacher[0][0].detach(), teacher[1].detach())
    return opd_kernels.TopKTeacher(mb.extras["topk_ids"], mb.extras["topk_logprobs"])


def loss_kl(mb: MicroBatch, logits: torch.Tensor, teacher_logits: torch.Tensor | None, *, temperature: float,
            tp_group, tp_size: int) -> torch.Tensor:
    """[S] KL(student || teacher) at the scoring rows (0 elsewhere), differentiable w.r.t. the student logits."""
    kw = dict(temperature=temperature, mask=mb.targets != IGNORE_INDEX, process_group=_group(tp_group, tp_size))
    if teacher_logits is not None:
        return opd_kernels.reverse_kl(logits[0], teacher_logits[0].detach(), **kw)
    return opd_kernels.topk_kl(logits[0], mb.extras["topk_ids"], mb.extras["topk_logprobs"], **kw)
