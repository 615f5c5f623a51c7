r"""``--opd-kl-mode full``: the exact reverse KL as a differentiable loss term of the Megatron trainer.

Why a loss and not an advantage penalty. The exact per-position KL_t = sum_v p_S(v|s_t) (log p_S(v|s_t) -
log p_T(v|s_t)) depends on the prefix s_t only, not on the sampled token a_t. Used as a (detached) advantage of
a_t, its policy-gradient contribution is KL_t * E_{a~p_S}[grad log p_S(a|s_t)] = 0 in expectation: it only adds
variance. Measured on the toy task (tiny Qwen3, lr 1e-3, 60 steps): the mean exact KL went 0.80 -> 1.13 with the
exact KL as an advantage penalty, 0.80 -> 0.51 as a loss, 0.80 -> 0.56 with the sampled k1 advantage. The loss
form is the sampled-k1 gradient with the expectation over the token taken analytically (zero variance):
grad_logits KL_t = p_S * (log p_S - log p_T - KL_t) / T, which ``opd_kernels.reverse_kl`` computes in its backward.

So in full mode the base advantages carry no OPD term and the trainer adds ``coef * reduce(KL_t)`` (same
reduction and normalisers as the policy loss) to each micro-batch loss. The teacher side comes from
- the Megatron teacher (``--opd-type megatron``): its logits on the same packed micro-batch, without gradients;
- the SGLang teacher's full distribution (``--opd-type sglang``): dense [R_i, V] log-prob rows per sample,
  placed at the micro-batch's scoring rows (normalised log-probs are valid logits, so the same fused op applies;
  with TP each rank takes its vocabulary slice).

This subclasses the backend's trainer and hooks its per-micro-batch loss; the backend owner may fold it into
``MegatronTrainer.train_step`` as a first-class option.
"""
from __future__ import annotations

import torch

from ..backends.megatron import MegatronTrainer
from ..backends.megatron.packing import IGNORE_INDEX, MicroBatch


class OPDTrainer(MegatronTrainer):
    _full_kl: tuple[float, list[torch.Tensor] | None] | None = None

    def train_step(self, batch, advantages, old_logprobs, *, opd_full_kl_coef: float | None = None,
                   teacher_rows: list[torch.Tensor] | None = None, **kwargs) -> dict[str, float]:
        """``MegatronTrainer.train_step`` plus, when ``opd_full_kl_coef`` is given, the exact-KL loss term.

        teacher_rows: per sample [R_i, V] teacher log-probs (SGLang teacher); None = the Megatron teacher.
        """
        if opd_full_kl_coef is None:
            return super().train_step(batch, advantages, old_logprobs, **kwargs)
        if teacher_rows is None and self.teacher is None:
            raise ValueError("the exact-KL loss needs teacher_rows (SGLang teacher) or a Megatron teacher")
        if teacher_rows is not None:
            for i, (rows, r) in enumerate(zip(teacher_rows, batch.response_lengths)):
                if tuple(rows.shape) != (r, self.actor.arch.vocab_size):
                    raise ValueError(f"teacher_rows[{i}] has shape {tuple(rows.shape)}, expected "
                                     f"({r}, {self.actor.arch.vocab_size}) (response length, vocab size)")
        self._full_kl = (float(opd_full_kl_coef), teacher_rows)
        try:
            if teacher_rows is None:
                self.teacher.onload()
            return super().train_step(batch, advantages, old_logprobs, **kwargs)
        finally:
            if teacher_rows is None and getattr(self, "teacher_offload", False):
                self.teacher.offload()
            self._full_kl = None

    def _teacher_logits(self, mb: MicroBatch, student_logits: torch.Tensor) -> torch.Tensor:
        coef, rows = self._full_kl
        if rows is None:
            with torch.no_grad():
                return self.teacher(mb)
        # Dense teacher rows at the scoring rows of this packed micro-batch; other rows get a uniform row (their
        # KL is masked out by the targets anyway). With TP, this rank's vocabulary slice. The rows are already
        # normalised log-probs at the rollout temperature T (the SGLang teacher rescales them), and the fused op
        # divides its inputs by T: pre-multiply by T so that softmax(rows * T / T) = exp(rows).
        vocab_shard = student_logits.shape[-1]
        start = self.ctx.tp_rank * vocab_shard
        out = torch.zeros((1, mb.num_tokens, vocab_shard), dtype=torch.float32, device=student_logits.device)
        for i, (a, b) in zip(mb.sample_ids, mb.spans):
            out[0, a:b] = rows[i][:, start:start + vocab_shard].to(out.device, torch.float32) * self.temperature
        return out

    def _policy_loss(self, settings, norm_kw: dict, mb: MicroBatch, output: torch.Tensor):
        loss, metrics = super()._policy_loss(settings, norm_kw, mb, output)
        if self._full_kl is None:
            return loss, metrics
        from ..algo import reduce_tokens
        from ..backends.megatron import scoring
        coef = self._full_kl[0]
        teacher_logits = self._teacher_logits(mb, output)
        kl = scoring.exact_reverse_kl(output, teacher_logits, mb, temperature=self.temperature,
                                      tp_group=self.ctx.tp_group, tp_size=self.ctx.tp_size)      # [S]
        kl = torch.where(mb.targets != IGNORE_INDEX, kl, torch.zeros_like(kl))
        kl_loss = reduce_tokens(mb.pad_spans(mb.split_rows(kl)), mb.span_mask(), settings.reduction, **norm_kw)
        total = loss + coef * kl_loss
        metrics = dict(metrics)
        if "loss" in metrics:
            metrics["loss"] = total.detach().float()
        return total, metrics
