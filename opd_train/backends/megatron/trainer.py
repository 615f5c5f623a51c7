"""The Megatron trainer: actor (student), optional reference model, Megatron teacher and PPO critic.

Call :func:`~opd_train.backends.megatron.dist.init_distributed` first (every rank), then build one
:class:`MegatronTrainer` per rank. All TP ranks of a data-parallel group must receive the same batches; the
data-parallel ranks receive disjoint shares of the global batch. Every public method is collective.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.distributed as dist

from ... import hf
from . import checkpoint as ckpt
from . import opd, scoring
from .batching import attach, check_same_batch, global_count, per_sample, reduce_metrics
from .config import LossSettings, ModelSource, TrainerSettings
from .cpu_compat import cpu_compat
from .dist import ParallelContext, current_context
from .engine import ModelEngine, arch_of_dir, arch_of_source
from .hf_io import write_hf_dir
from .model import DTYPES, final_hidden_states
from .opd import TeacherRows
from .packing import MicroBatch, TrainBatch, pack_microbatches


@dataclass
class ForwardResult:
    """Per-sample response-span tensors ([R_i] fp32, CPU, batch order); None where not computed.

    OPD forward only: ``advantages`` = A - advantage_coef * KL_t, ``opd_kl`` = the per-token KL term (the sampled
    estimator, or the KL from the teacher's distribution), ``teacher_logprobs`` = log p_T of the response tokens.
    """
    logprobs: list[torch.Tensor] | None = None
    entropy: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    advantages: list[torch.Tensor] | None = None
    opd_kl: list[torch.Tensor] | None = None
    teacher_logprobs: list[torch.Tensor] | None = None


class MegatronTrainer:
    """See the package docstring for the API. ``trainer.step`` counts optimizer steps (restored on resume)."""

    def __init__(self, settings: TrainerSettings, ctx: ParallelContext | None = None):
        if not isinstance(settings, TrainerSettings):
            raise TypeError(f"MegatronTrainer needs a TrainerSettings, got {type(settings).__name__}")
        self.settings = settings
        self.ctx = ctx or current_context()
        if settings.parallel.tensor_parallel != self.ctx.tp_size:
            raise ValueError(f"ParallelSettings.tensor_parallel={settings.parallel.tensor_parallel} but the process "
                             f"groups were initialised with tensor_parallel={self.ctx.tp_size} (init_distributed)")
        self.temperature = float(settings.temperature)
        self.step = 0
        self.ref = self.teacher = self.critic = None
        with cpu_compat():
            self._build_actor()
            if settings.reference is not None:
                self.ref = self._frozen(settings.reference, "reference")
            if settings.teacher is not None:
                t = settings.teacher
                self.load_teacher(t.load, t.step, offload=t.offload)
            if settings.critic is not None:
                self._build_critic()

    # ---- construction ------------------------------------------------------------------------------------
    def _build_actor(self) -> None:
        s = self.settings
        source_arch = arch_of_source(s.model)
        resume = ckpt.has_checkpoint(s.checkpoint.load)
        arch = ckpt.read_arch(s.checkpoint.load) if resume else source_arch
        if resume and not arch.same_shape_as(source_arch):
            raise ValueError(f"--load {s.checkpoint.load!r} holds a different architecture than the model source; "
                             "point --load at a checkpoint of this model or drop it")
        self.actor = ModelEngine(arch, self.ctx, dtype=s.precision.dtype, optimizer=s.optimizer, name="actor")
        if resume:
            self.load_checkpoint(s.checkpoint.load, load_optimizer=not s.checkpoint.no_load_optim)
        else:
            self.actor.load_source(s.model)
        if s.model.hf_path is not None:
            self.actor.tokenizer_src = s.model.hf_path

    def _frozen(self, source: ModelSource, name: str) -> ModelEngine:
        arch = arch_of_source(source)
        if arch.vocab_size != self.actor.arch.vocab_size:
            raise ValueError(f"the {name} model's vocab_size={arch.vocab_size} differs from the student's "
                             f"{self.actor.arch.vocab_size}; they must share a vocabulary")
        engine = ModelEngine(arch, self.ctx, dtype=self.settings.precision.dtype, name=name)
        engine.load_source(source)
        return engine

    def _build_critic(self) -> None:
        c = self.settings.critic
        self.critic = ModelEngine(arch_of_source(c.source), self.ctx, dtype=self.settings.precision.dtype,
                                  optimizer=c.optimizer, value_head=True, name="critic")
        critic_dir = self._critic_dir(self.settings.checkpoint.load)
        if ckpt.has_checkpoint(critic_dir):
            step = ckpt.resolve_iteration(critic_dir, self.step)
            load_optimizer = not self.settings.checkpoint.no_load_optim
            self.critic.load_full_checkpoint(critic_dir, step, load_optimizer=load_optimizer)
        else:
            self.critic.load_source(c.source)

    @staticmethod
    def _critic_dir(directory: str | None) -> str | None:
        return os.path.join(directory, "critic") if directory else None

    def load_teacher(self, directory: str, step: int | None = None, *, offload: bool = False) -> None:
        """Load the Megatron teacher (torch_dist checkpoint dir, or a HF dir) as its own frozen model.

        It may differ from the student in size and architecture but must share the tokenizer (checked by
        ``hf.teacher_mismatch``); its embedding may be padded beyond the student's (Qwen's 151936 / 152064 rows:
        the ops read its logits over the student's columns), except under tensor parallelism, where the shards of
        the two vocabularies would not line up. The student's live weights are not touched. ``step`` picks the
        checkpoint iteration (``--opd-teacher-ckpt-step``; default: the latest).
        """
        with cpu_compat():
            arch, kind = arch_of_dir(directory, step)
            student_vocab = self.actor.arch.vocab_size
            if arch.vocab_size < student_vocab or (arch.vocab_size != student_vocab and self.ctx.tp_size > 1):
                why = ("OPD needs the student's vocabulary" if arch.vocab_size < student_vocab else
                       "a padded teacher vocabulary is supported without tensor parallelism only")
                raise ValueError(f"teacher vocab_size={arch.vocab_size} vs the student's {student_vocab}: {why}")
            engine = ModelEngine(arch, self.ctx, dtype=self.settings.precision.dtype, name="teacher")
            if kind == "checkpoint":
                engine.load_model_checkpoint(directory, step)
            else:
                engine.load_hf(directory)
            problem = hf.teacher_mismatch(self.actor.tokenizer_src, self.actor.arch.vocab_size,
                                          engine.tokenizer_src, arch.vocab_size)
            if problem:
                raise ValueError(problem)
            self.teacher = engine
            self.teacher_offload = offload
            if offload:
                engine.offload()

    # ---- forward-only scoring ----------------------------------------------------------------------------
    def _pack(self, batch: TrainBatch) -> list[MicroBatch]:
        batch.validate(self.actor.arch.vocab_size)
        check_same_batch(batch, self.ctx.tp_group, self.ctx.tp_size, self.ctx.device)
        return pack_microbatches(batch, self.settings.batching.max_tokens_per_microbatch,
                                 thd=self.actor.module.use_te, device=self.ctx.device)

    def _check_forward_request(self, batch, actor, with_entropy, ref, values, advantages, teacher) -> None:
        if with_entropy and (not actor or advantages is not None):
            raise ValueError("with_entropy=True needs actor=True and the plain forward (the OPD forward's fused op "
                             "returns log-probs, KL and advantages; the train step reports the entropy)")
        for wanted, engine, what in ((ref, self.ref, "ref=True needs a reference model (TrainerSettings.reference)"),
                                     (values, self.critic, "values=True needs a critic (TrainerSettings.critic)")):
            if wanted and engine is None:
                raise ValueError(what)
        o = self.settings.opd
        if advantages is not None:
            if o is None or not actor:
                raise ValueError("advantages= runs the OPD forward: it needs TrainerSettings.opd and actor=True")
            if (teacher is None) == (self.teacher is None):
                raise ValueError("the OPD forward needs exactly one teacher: the Megatron teacher (load_teacher) or "
                                 "an SGLang teacher's TeacherRows (teacher=)")
            teacher.check(batch, o) if teacher is not None else None
        elif teacher is not None:
            raise ValueError("teacher= rows are read by the OPD forward only (pass advantages=)")

    def forward(self, batch: TrainBatch, *, actor: bool = True, with_entropy: bool = False, ref: bool = False,
                values: bool = False, advantages=None, teacher: TeacherRows | None = None) -> ForwardResult:
        """Forward-only scoring of the response spans, one packed micro-batch at a time (no gradients).

        actor: student log-probs (the old policy's, when called before training); with_entropy adds the entropy.
        ref: reference log-probs.
        values: critic values at the scoring rows. All at ``settings.temperature``.
        advantages: per-sample base advantages ([R_i] list or padded [B, R_max]): the OPD forward
            (``settings.opd``, module ``opd``): per micro-batch (per chunk of its token rows on the fused output
            layer path, ``BatchingSettings.fused_output_layer``) ONE fused ``opd_kernels.opd_advantages`` call on
            the student logits gives ``logprobs``, ``opd_kl`` and ``advantages`` = A - advantage_coef * KL_t, with
            the Megatron teacher's logits of the same rows or ``teacher`` (an SGLang teacher's rows).
        """
        self._check_forward_request(batch, actor, with_entropy, ref, values, advantages, teacher)
        with cpu_compat(), torch.no_grad():
            mbs = self._pack(batch)
            if advantages is not None:
                base = per_sample(advantages, batch, "advantages")
                for mb in mbs:
                    mb.extras["adv_rows"] = mb.place(base, 0.0).to(self.ctx.device)
                opd.attach_teacher(mbs, teacher, self.ctx.device)
            megatron_teacher = advantages is not None and self.teacher is not None
            if megatron_teacher:
                self.teacher.onload()
            try:
                want = dict(actor=actor, entropy=with_entropy, ref=ref, values=values, opd=advantages is not None)
                per_mb = [self._score(mb, want) for mb in mbs]
            finally:
                if megatron_teacher and self.teacher_offload:
                    self.teacher.offload()
        result = ForwardResult()
        for f in fields(ForwardResult):
            if f.name in per_mb[0]:
                ordered: list = [None] * len(batch)
                for mb, scores in zip(mbs, per_mb):
                    for i, t in zip(mb.sample_ids, scores[f.name]):
                        ordered[i] = t.float().cpu()
                setattr(result, f.name, ordered)
        return result

    def _kw(self) -> dict:
        return dict(temperature=self.temperature, tp_group=self.ctx.tp_group, tp_size=self.ctx.tp_size)

    @property
    def fused(self) -> bool:
        """Output layer fused with the loss, chunked over tokens (BatchingSettings.fused_output_layer)."""
        return self.settings.batching.fused_output_layer

    def _fkw(self) -> dict:
        return dict(self._kw(), chunk=self.settings.batching.fused_linear_chunk_tokens)

    def _teacher_out(self, mb: MicroBatch):
        """The Megatron teacher's (hidden [1, S, d_t], output weight) on the fused path, else its logits (no grad)."""
        with torch.no_grad():
            return (self.teacher.hidden(mb), self.teacher.output_weight) if self.fused else self.teacher(mb)

    def _logprob_rows(self, engine: ModelEngine, mb: MicroBatch, with_entropy: bool = False) -> dict:
        if self.fused:
            out = scoring.fused_rows(engine.hidden(mb), engine.output_weight, mb, with_entropy=with_entropy,
                                     **self._fkw())
            return {"logprobs": out.logp, **({"entropy": out.entropy} if with_entropy else {})}
        out = scoring.token_logprobs(engine(mb), mb, with_entropy=with_entropy, **self._kw())
        return dict(zip(("logprobs", "entropy"), out)) if with_entropy else {"logprobs": out}

    def _opd_rows(self, mb: MicroBatch) -> dict:
        teacher = self._teacher_out(mb) if self.teacher is not None else None
        if self.fused:
            return opd.forward_rows_fused(mb, self.actor.hidden(mb), self.actor.output_weight, teacher,
                                          self.settings.opd, **self._fkw())
        return opd.forward_rows(mb, self.actor(mb), teacher, self.settings.opd, **self._kw())

    def _score(self, mb: MicroBatch, want: dict) -> dict[str, list[torch.Tensor]]:
        rows: dict[str, torch.Tensor] = {}
        if want["actor"]:
            rows.update(self._opd_rows(mb) if want["opd"] else self._logprob_rows(self.actor, mb, want["entropy"]))
        if want["ref"]:
            rows["ref_logprobs"] = self._logprob_rows(self.ref, mb)["logprobs"]
        if want["values"]:
            rows["values"] = scoring.values(self.critic(mb))
        return {k: mb.split_rows(v) for k, v in rows.items()}

    # ---- training ----------------------------------------------------------------------------------------
    def _run_schedule(self, engine: ModelEngine, mbs: list[MicroBatch], loss_fn, *, hidden: bool = False
                      ) -> list[dict]:
        """Forward + backward of all micro-batches through Megatron's schedule (grad accumulation + DP sync).
        ``hidden``: the model returns its final hidden states [1, S, d] (the fused path) instead of its output."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        engine.model.zero_grad_buffer()
        with warnings.catch_warnings():
            # Megatron's distributed optimizer probes ``.grad`` of its fp32 shard views (non-leaf tensors) when
            # zeroing; torch warns on every such probe. Harmless, and not ours to change.
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            engine.optimizer.zero_grad()

        def loss_and_copies(mb, output):
            loss, metrics = loss_fn(mb, output)
            # Copies: Megatron's schedule divides the returned loss IN PLACE by the number of micro-batches,
            # and detached metrics may share its storage.
            return loss, {k: v.detach().clone().float() for k, v in metrics.items()}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb.input_ids, mb.position_ids, mb.attention_mask, packed_seq_params=mb.packed_seq_params,
                           **({"output_processor": final_hidden_states} if hidden else {}))
            return output, partial(loss_and_copies, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[engine.model],
            num_microbatches=len(mbs), seq_length=max(mb.num_tokens for mb in mbs), micro_batch_size=1,
            forward_only=False)

    def _normaliser(self, batch, reduction, num_samples, num_tokens, n_mbs) -> tuple[dict, float, float]:
        from opd_train.algo import loss_normalizer
        given = num_samples if reduction == "sample_mean" else num_tokens
        count = global_count(batch, reduction, given, self.ctx.dp_group, self.ctx.device)
        # Megatron's schedule divides each micro-batch loss by the number of micro-batches and its DDP averages
        # gradients over DP ranks; this normaliser undoes both, so the step equals one big-batch step.
        norm = loss_normalizer(count, dp_world_size=self.ctx.dp_size, dp_averages_gradients=True,
                               num_microbatches=n_mbs, schedule_divides_by_microbatches=True)
        key = "num_samples" if reduction == "sample_mean" else "num_tokens"
        return {key: norm}, norm, count

    def _optimizer_step(self, engine: ModelEngine, per_mb: list[dict], scale: float) -> dict[str, float]:
        ok, grad_norm, _ = engine.optimizer.step()
        if ok:
            engine.scheduler.step(increment=1)
        metrics = reduce_metrics(per_mb, scale=scale, dp_group=self.ctx.dp_group, device=self.ctx.device)
        metrics.update(grad_norm=float(grad_norm if grad_norm is not None else float("nan")),
                       lr=float(engine.optimizer.param_groups[0]["lr"]), update_successful=float(bool(ok)))
        return metrics

    def train_step(self, batch: TrainBatch, advantages, old_logprobs, *, loss: LossSettings = LossSettings(),
                   ref_logprobs=None, teacher: TeacherRows | None = None, num_samples: float | None = None,
                   num_tokens: float | None = None) -> dict[str, float]:
        """One optimizer step of the actor on this rank's share of the global batch.

        advantages / old_logprobs / ref_logprobs: per-sample [R_i] (list) or right-padded [B, R_max] tensors,
        the final (OPD-shaped, whitened) advantages and the behaviour-policy log-probs. ``num_samples``
        (sample_mean) / ``num_tokens`` (token_mean): the GLOBAL-batch count over all DP ranks; default: summed
        over DP ranks here. Returns global metrics (loss, pg_loss, clipfrac, entropy, ..., grad_norm, lr).

        With ``settings.opd.loss_coef > 0`` the loss gains ``loss_coef * reduce(KL_t)`` (same reduction and
        normalisers as the policy loss; gradient through the fused kernel's backward): KL_t from the Megatron
        teacher's logits of the same micro-batch (exact), or from ``teacher`` (an SGLang teacher's top-K).
        On the fused output layer path (the default) the model returns its final hidden states and ONE
        ``opd_kernels.fused_linear_logprobs`` call per micro-batch gives the log-probs, entropy and KL from them
        and the output weight (the teacher's hidden states and head for the exact KL), chunked over tokens.
        """
        if loss.ref_kl_coef and ref_logprobs is None:
            raise ValueError("LossSettings.ref_kl_coef > 0 needs ref_logprobs")
        kl_loss = self.settings.opd is not None and self.settings.opd.loss_coef > 0
        if kl_loss and (teacher is None) == (self.teacher is None):
            raise ValueError("the OPD KL loss needs exactly one teacher: the Megatron teacher or teacher=TeacherRows")
        if teacher is not None:
            if not kl_loss:
                raise ValueError("teacher= rows are read by the OPD KL loss only (OPDSettings.loss_coef > 0)")
            teacher.check(batch, self.settings.opd)
        with cpu_compat():
            mbs = self._pack(batch)
            attach(mbs, self.ctx.device, adv=per_sample(advantages, batch, "advantages"),
                   old=per_sample(old_logprobs, batch, "old_logprobs"),
                   ref=None if ref_logprobs is None else per_sample(ref_logprobs, batch, "ref_logprobs"))
            opd.attach_teacher(mbs, teacher, self.ctx.device)
            norm_kw, norm, count = self._normaliser(batch, loss.reduction, num_samples, num_tokens, len(mbs))
            megatron_teacher = kl_loss and self.teacher is not None
            if megatron_teacher:
                self.teacher.onload()
            try:
                per_mb = self._run_schedule(self.actor, mbs, partial(self._actor_loss, loss, norm_kw, kl_loss),
                                            hidden=self.fused)
            finally:
                if megatron_teacher and self.teacher_offload:
                    self.teacher.offload()
            metrics = self._optimizer_step(self.actor, per_mb, scale=norm / count)
        self.step += 1
        metrics["step"] = float(self.step)
        return metrics

    def _actor_rows(self, mb: MicroBatch, output: torch.Tensor, kl_loss: bool):
        """(logp, entropy, kl or None) [S] of the model output: final hidden states on the fused path (ONE chunked
        pass gives all three), else logits."""
        teacher = self._teacher_out(mb) if kl_loss and self.teacher is not None else None
        if self.fused:
            out = scoring.fused_rows(output, self.actor.output_weight, mb, with_entropy=True,
                                     teacher=opd.kl_teacher(mb, teacher) if kl_loss else None, **self._fkw())
            return out.logp, out.entropy, out.kl
        logp, entropy = scoring.token_logprobs(output, mb, with_entropy=True, **self._kw())
        return logp, entropy, opd.loss_kl(mb, output, teacher, **self._kw()) if kl_loss else None

    def _actor_loss(self, settings: LossSettings, norm_kw: dict, kl_loss: bool, mb: MicroBatch,
                    output: torch.Tensor):
        logp, entropy, kl = self._actor_rows(mb, output, kl_loss)                           # [S] each
        loss, metrics = self._policy_loss(settings, norm_kw, mb, logp, entropy)
        if not kl_loss:
            return loss, metrics
        from opd_train.algo import reduce_tokens
        mask = mb.span_mask()
        kl_spans = mb.pad_spans(mb.split_rows(kl))
        total = loss + self.settings.opd.loss_coef * reduce_tokens(kl_spans, mask, settings.reduction, **norm_kw)
        opd_kl = (kl_spans.detach() * mask).sum() / mask.sum().clamp(min=1)
        return total, {**metrics, "loss": total.detach(), "opd_kl": opd_kl}

    def _policy_loss(self, settings: LossSettings, norm_kw: dict, mb: MicroBatch, logp: torch.Tensor,
                     entropy: torch.Tensor):
        from opd_train.algo import policy_loss
        if settings.entropy_coef == 0:
            entropy = entropy.detach()                  # the metric only: no entropy term in the backward
        mask = mb.span_mask()
        loss, metrics = policy_loss(
            mb.pad_spans(mb.split_rows(logp)), mb.extras["old"], mb.extras["adv"], mask,
            eps_clip=settings.eps_clip, eps_clip_high=settings.eps_clip_high, dual_clip=settings.dual_clip,
            sequence_level_ratio=settings.sequence_level_ratio, reduction=settings.reduction,
            entropy=mb.pad_spans(mb.split_rows(entropy)),
            entropy_coef=settings.entropy_coef, ref_logprobs=mb.extras.get("ref"),
            ref_kl_coef=settings.ref_kl_coef, ref_kl=settings.ref_kl, **norm_kw)
        return loss, {**metrics, "_ntok": mask.sum()}

    def train_critic_step(self, batch: TrainBatch, returns, old_values, *, loss: LossSettings = LossSettings(),
                          num_samples: float | None = None, num_tokens: float | None = None) -> dict[str, float]:
        """One optimizer step of the critic: clipped value loss against ``returns`` (never OPD-shaped)."""
        if self.critic is None:
            raise ValueError("train_critic_step needs a critic (TrainerSettings.critic)")
        with cpu_compat():
            mbs = self._pack(batch)
            attach(mbs, self.ctx.device, ret=per_sample(returns, batch, "returns"),
                   old=per_sample(old_values, batch, "old_values"))
            norm_kw, norm, count = self._normaliser(batch, loss.reduction, num_samples, num_tokens, len(mbs))
            per_mb = self._run_schedule(self.critic, mbs, partial(self._value_loss, loss, norm_kw))
            return self._optimizer_step(self.critic, per_mb, scale=norm / count)

    def _value_loss(self, settings: LossSettings, norm_kw: dict, mb: MicroBatch, output: torch.Tensor):
        from opd_train.algo import value_loss
        mask = mb.span_mask()
        loss, metrics = value_loss(mb.pad_spans(mb.split_rows(scoring.values(output))), mb.extras["old"],
                                   mb.extras["ret"], mask, value_clip=settings.value_clip,
                                   reduction=settings.reduction, **norm_kw)
        return loss, {**metrics, "_ntok": mask.sum()}

    # ---- checkpoints and export --------------------------------------------------------------------------
    def _meta(self, engine: ModelEngine) -> dict:
        return {"has_optimizer": engine.optimizer is not None, "tensor_parallel": self.ctx.tp_size,
                "data_parallel": self.ctx.dp_size, "dtype": engine.dtype, "role": engine.name,
                "distributed_optimizer": self.settings.optimizer.use_distributed_optimizer}

    def save_checkpoint(self, directory: str | None = None, step: int | None = None) -> str:
        """Save actor (+ critic under ``DIR/critic``) model, optimizer, LR schedule and step; returns the iter dir."""
        directory = directory or self.settings.checkpoint.save
        if not directory:
            raise ValueError("save_checkpoint needs a directory (argument or CheckpointSettings.save)")
        step = self.step if step is None else step
        with cpu_compat():
            state = self.actor.state_dict_for_save(True, {"step": step})
            path = ckpt.save(directory, step, state, arch=self.actor.arch, meta=self._meta(self.actor),
                             tokenizer_src=self.actor.tokenizer_src)
            if self.critic is not None:
                ckpt.save(self._critic_dir(directory), step, self.critic.state_dict_for_save(True, {"step": step}),
                          arch=self.critic.arch, meta=self._meta(self.critic))
        return path

    def maybe_save(self) -> str | None:
        """``--save-interval``: save when the current step is a multiple of it (returns the path or None)."""
        c = self.settings.checkpoint
        if c.save and c.save_interval and self.step % c.save_interval == 0:
            return self.save_checkpoint(c.save, self.step)
        return None

    def load_checkpoint(self, directory: str, step: int | None = None, *, load_optimizer: bool = True) -> int:
        """Resume the actor (and critic, when present) from ``directory``; returns the loaded step."""
        with cpu_compat():
            step = ckpt.resolve_iteration(directory, step)
            stored = ckpt.read_arch(directory, step)
            if not stored.same_shape_as(self.actor.arch):
                raise ValueError(f"{ckpt.iteration_dir(directory, step)} holds a different architecture than the "
                                 "student")
            extras = self.actor.load_full_checkpoint(directory, step, load_optimizer=load_optimizer)
            self.actor.tokenizer_src = os.path.join(ckpt.iteration_dir(directory, step), "hf")
            critic_dir = self._critic_dir(directory)
            if self.critic is not None and step in ckpt.list_iterations(critic_dir):
                self.critic.load_full_checkpoint(critic_dir, step, load_optimizer=load_optimizer)
        self.step = int(extras.get("step", step))
        return self.step

    def export_hf(self, directory: str, *, dtype: str | None = None) -> str:
        """Write the student as a HF model dir (safetensors + config + tokenizer files), atomically, on rank 0."""
        with cpu_compat():
            tensors = self.actor.hf_tensors() if self.ctx.dp_rank == 0 else None
            if self.ctx.rank == 0:
                write_hf_dir(tensors, self.actor.arch.hf_config, directory, tokenizer_src=self.actor.tokenizer_src,
                             dtype=DTYPES[dtype] if dtype else None)
            dist.barrier()
        return directory

    def actor_hf_tensors(self) -> dict[str, torch.Tensor]:
        """The student's full HF-named weights (collective over the TP group; for weight sync and tests)."""
        with cpu_compat():
            return self.actor.hf_tensors()
