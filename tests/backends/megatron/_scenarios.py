"""Scenarios run inside Megatron worker processes (see ``_worker.py``); the tests assert on what they return.

Each function takes the spec (paths of the tiny HF models built by conftest.py) and the output dir, and
returns a dict of plain data / tensors (saved by rank 0) or saves per-rank files itself.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from opd_train.backends.megatron import (BatchingSettings, CheckpointSettings, CriticSettings, LossSettings,
                                         MegatronTrainer, ModelSource, OPDSettings, OptimizerSettings,
                                         ParallelSettings, PrecisionSettings, TeacherRows, TeacherSettings, TrainBatch,
                                         TrainerSettings, convert_hf_to_torch_dist, convert_torch_dist_to_hf,
                                         cpu_compat, init_distributed)
from opd_train.backends.megatron import checkpoint as ckpt
from opd_train.backends.megatron.engine import ModelEngine, arch_of_dir
from opd_train.backends.megatron.dist import current_context
from opd_train.backends.megatron.packing import IGNORE_INDEX, pack_microbatches

VOCAB = 256


def make_batch(seed: int, n: int, *, min_len: int = 8, max_len: int = 26) -> TrainBatch:
    """Random samples of varied lengths; every third sample has a masked-out response token."""
    g = torch.Generator().manual_seed(seed)
    tokens, lengths, masks = [], [], []
    for i in range(n):
        total = int(torch.randint(min_len, max_len, (1,), generator=g))
        r = int(torch.randint(2, total - 2, (1,), generator=g))
        tokens.append(torch.randint(0, VOCAB, (total,), generator=g).tolist())
        lengths.append(r)
        masks.append([0 if (i % 3 == 1 and j == 0) else 1 for j in range(r)])
    return TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=masks)


def subset(batch: TrainBatch, idx: list[int]) -> TrainBatch:
    return TrainBatch(tokens=[batch.tokens[i] for i in idx], response_lengths=[batch.response_lengths[i] for i in idx],
                      loss_masks=[batch.loss_masks[i] for i in idx])


def per_sample_noise(batch_idx: list[int], lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Deterministic per GLOBAL sample index, so every TP/DP layout sees the same values."""
    return [torch.randn(r, generator=torch.Generator().manual_seed(seed * 1000 + i))
            for i, r in zip(batch_idx, lengths)]


def _batch_dict(batch: TrainBatch) -> dict:
    return {"tokens": batch.tokens, "response_lengths": batch.response_lengths, "loss_masks": batch.loss_masks}


# ---- conversion -----------------------------------------------------------------------------------------------
def convert(spec: dict, out: str) -> dict:
    ctx = current_context()
    batch = make_batch(5, 1, min_len=20, max_len=30)
    res = {"batch": _batch_dict(batch)}
    for name in ("qwen3", "qwen3_tied", "qwen2", "llama"):
        hf_dir, dist_dir, back = spec["hf"][name], f"{out}/dist_{name}", f"{out}/back_{name}"
        convert_hf_to_torch_dist(hf_dir, dist_dir, step=0)
        convert_torch_dist_to_hf(dist_dir, back)
        arch, _ = arch_of_dir(hf_dir)
        with cpu_compat(), torch.no_grad():
            mb = pack_microbatches(batch, 4096)[0]
            from_hf = ModelEngine(arch, ctx, name="from_hf")
            from_hf.load_hf(hf_dir)
            from_dist = ModelEngine(arch, ctx, name="from_dist")
            from_dist.load_model_checkpoint(dist_dir)
            res[name] = {"logits": from_hf(mb)[0].clone(), "logits_from_dist": from_dist(mb)[0].clone(),
                         "dist_dir": dist_dir, "back": back, "iterations": ckpt.list_iterations(dist_dir)}
    return res


# ---- packing, temperature, export ---------------------------------------------------------------------------
def packing(spec: dict, out: str) -> dict:
    batch = make_batch(11, 6)
    results = {"batch": _batch_dict(batch), "temperature": 0.7}
    for label, budget in (("packed", 64), ("single", 1)):
        trainer = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=0.7,
                                                  batching=BatchingSettings(max_tokens_per_microbatch=budget)))
        f = trainer.forward(batch, with_entropy=True)
        results[label] = {"logprobs": f.logprobs, "entropy": f.entropy,
                          "microbatches": [m.sample_ids for m in pack_microbatches(batch, budget)]}
        if label == "packed":
            results["export_dir"] = trainer.export_hf(f"{out}/export_qwen3")
        del trainer
    return results


# ---- tensor / data parallel equality ------------------------------------------------------------------------
GLOBAL_BATCH = 6


def _train_two_steps(spec: dict, tp: int, idx: list[int]) -> dict:
    batch = subset(make_batch(31, GLOBAL_BATCH), idx)
    trainer = MegatronTrainer(TrainerSettings(
        model=ModelSource(hf_path=spec["hf"]["qwen3"]), parallel=ParallelSettings(tensor_parallel=tp),
        optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.5), batching=BatchingSettings(max_tokens_per_microbatch=48)))
    f = trainer.forward(batch, with_entropy=True)
    adv = per_sample_noise(idx, batch.response_lengths, 1)
    old = [lp + 0.05 * n for lp, n in zip(f.logprobs, per_sample_noise(idx, batch.response_lengths, 2))]
    m1 = trainer.train_step(batch, adv, old, loss=LossSettings(entropy_coef=0.01))
    m2 = trainer.train_step(batch, adv, old, loss=LossSettings(reduction="token_mean", eps_clip=0.1))
    weights = trainer.actor_hf_tensors()
    n_mbs = len(pack_microbatches(batch, 48))
    del trainer
    return {"idx": idx, "logprobs": f.logprobs, "entropy": f.entropy, "m1": m1, "m2": m2, "weights": weights,
            "microbatches": n_mbs}


def parallel_ref(spec: dict, out: str) -> dict:
    return _train_two_steps(spec, 1, list(range(GLOBAL_BATCH)))


def parallel(spec: dict, out: str) -> None:
    rank = dist.get_rank()
    init_distributed(rank=rank, world_size=2, tensor_parallel=2)
    torch.save(_train_two_steps(spec, 2, list(range(GLOBAL_BATCH))), f"{out}/parallel_tp2_rank{rank}.pt")
    init_distributed(rank=rank, world_size=2, tensor_parallel=1)
    torch.save(_train_two_steps(spec, 1, list(range(rank, GLOBAL_BATCH, 2))), f"{out}/parallel_dp2_rank{rank}.pt")


# ---- checkpoints: resume and interrupted saves ----------------------------------------------------------------
def _step(trainer: MegatronTrainer, step: int) -> dict:
    batch = make_batch(100 + step, 4)
    f = trainer.forward(batch)
    adv = per_sample_noise(list(range(4)), batch.response_lengths, 50 + step)
    return trainer.train_step(batch, adv, f.logprobs)


def _resume_settings(spec: dict, **checkpoint) -> TrainerSettings:
    return TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), checkpoint=CheckpointSettings(**checkpoint),
                           optimizer=OptimizerSettings(lr=2e-3, lr_warmup_steps=1, lr_decay_steps=8,
                                                       lr_decay_style="cosine", min_lr=1e-4, weight_decay=0.01))


def resume_a(spec: dict, out: str) -> dict:
    """The uninterrupted run: 4 steps, --save-interval 2 (iterations 2 and 4)."""
    trainer = MegatronTrainer(_resume_settings(spec, save=f"{out}/resume_ckpt", save_interval=2))
    metrics, weights = {}, {}
    for step in range(1, 5):
        metrics[step] = _step(trainer, step)
        trainer.maybe_save()
        weights[step] = trainer.actor_hf_tensors()
    return {"metrics": metrics, "weights": weights, "dir": f"{out}/resume_ckpt",
            "iterations": ckpt.list_iterations(f"{out}/resume_ckpt")}


def frozen(spec: dict, out: str) -> dict:
    """--freeze-params-name-list embedding: two steps (saved), a resume from the save and a third step; then a
    pattern that matches no parameter, and one that freezes everything."""
    def settings(**checkpoint):
        return TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]),
                               checkpoint=CheckpointSettings(**checkpoint),
                               optimizer=OptimizerSettings(lr=2e-3, freeze=("embedding",)))
    trainer = MegatronTrainer(settings(save=f"{out}/frozen_ckpt"))
    res = {"before": trainer.actor_hf_tensors(), "frozen": trainer.actor.frozen}
    for step in (1, 2):
        _step(trainer, step)
    trainer.save_checkpoint(f"{out}/frozen_ckpt", 2)
    res["after"] = trainer.actor_hf_tensors()
    resumed = MegatronTrainer(settings(load=f"{out}/frozen_ckpt"))
    res["resumed_step"] = resumed.step
    _step(resumed, 3)
    res["after_resume"] = resumed.actor_hf_tensors()
    for key, optimizer in (("typo", OptimizerSettings(freeze=("embeding",))),
                           ("everything", OptimizerSettings(only_train=("nothing_to_train|embedding",),
                                                            freeze=("embedding",)))):
        try:
            MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), optimizer=optimizer))
            res[key] = None
        except ValueError as exc:
            res[key] = str(exc)
    return res


def resume_b(spec: dict, out: str) -> dict:
    """A new process: --load resumes the latest (4); then resume iteration 2 explicitly and redo steps 3-4."""
    trainer = MegatronTrainer(_resume_settings(spec, load=f"{out}/resume_ckpt"))
    res = {"loaded_step": trainer.step, "weights_loaded": trainer.actor_hf_tensors()}
    res["explicit_step"] = trainer.load_checkpoint(f"{out}/resume_ckpt", 2)
    res["metrics"] = {step: _step(trainer, step) for step in (3, 4)}
    res["weights"] = trainer.actor_hf_tensors()
    return res


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def crash(spec: dict, out: str) -> None:
    """Save step 1, train step 2, then get SIGKILLed after the step-2 shards are written (before publishing)."""
    trainer = MegatronTrainer(_resume_settings(spec, save=f"{out}/crash_ckpt"))
    record = {"m1": _step(trainer, 1)}
    trainer.save_checkpoint()
    record["weights_1"] = trainer.actor_hf_tensors()
    record["m2"] = _step(trainer, 2)
    record["weights_2"] = trainer.actor_hf_tensors()
    torch.save(record, f"{out}/crash_record.pt")
    ckpt._write_metadata = _die
    trainer.save_checkpoint()
    raise AssertionError("the injected fault did not kill the save")


def after_crash(spec: dict, out: str) -> dict:
    directory = f"{out}/crash_ckpt"
    stale = sorted(n for n in os.listdir(directory) if n.startswith(".tmp_iter_"))
    stale_files = sum(len(files) for _, _, files in os.walk(os.path.join(directory, stale[0]))) if stale else 0
    trainer = MegatronTrainer(_resume_settings(spec, load=directory, save=directory))
    res = {"stale_before": stale, "stale_files": stale_files, "loaded_step": trainer.step,
           "weights_loaded": trainer.actor_hf_tensors(), "iterations_before": ckpt.list_iterations(directory)}
    res["m2"] = _step(trainer, 2)
    res["weights_2"] = trainer.actor_hf_tensors()
    trainer.save_checkpoint()
    res["iterations_after"] = ckpt.list_iterations(directory)
    res["stale_after"] = sorted(n for n in os.listdir(directory) if n.startswith(".tmp_iter_"))
    res["tracker"] = open(os.path.join(directory, ckpt.TRACKER)).read()
    return res


# ---- the Megatron teacher -------------------------------------------------------------------------------------
EXACT = OPDSettings(estimator=None, advantage_coef=0.0, loss_coef=1.0)       # the exact KL, as a loss term


def teacher(spec: dict, out: str) -> dict:
    from opd_train.algo import apply_opd
    tdir, sdir = f"{out}/teacher_ckpt", f"{out}/student_dist"
    convert_hf_to_torch_dist(spec["hf"]["teacher_a"], tdir, step=3)
    convert_hf_to_torch_dist(spec["hf"]["teacher_b"], tdir, step=7)
    convert_hf_to_torch_dist(spec["hf"]["qwen3"], sdir, step=0)
    trainer = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=0.8,
                                              teacher=TeacherSettings(load=tdir, step=3, offload=True), opd=EXACT))
    batch = make_batch(21, 4)
    zeros = [torch.zeros(r) for r in batch.response_lengths]
    before = trainer.actor_hf_tensors()
    res = {"batch": _batch_dict(batch), "temperature": 0.8}
    res["step3"] = vars(trainer.forward(batch, advantages=zeros))
    trainer.load_teacher(tdir)
    res["step7"] = vars(trainer.forward(batch, advantages=zeros))
    res["errors"] = {}
    plain = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"])))
    for label, call in (("missing", lambda: trainer.load_teacher(tdir, step=5)),
                        ("vocab", lambda: trainer.load_teacher(spec["hf"]["bad_vocab"])),
                        ("opd_without_settings", lambda: plain.forward(batch, advantages=zeros)),
                        ("two_teachers", lambda: trainer.forward(batch, advantages=zeros, teacher=TeacherRows(zeros)))):
        try:
            call()
            res["errors"][label] = None
        except (ValueError, FileNotFoundError) as exc:
            res["errors"][label] = f"{type(exc).__name__}: {exc}"
    after = trainer.actor_hf_tensors()
    res["student_unchanged"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trainer.load_teacher(sdir)           # teacher == student: the exact KL is 0 ...
    res["same_exact_kl"] = trainer.forward(batch, advantages=zeros).opd_kl
    sampled = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=0.8,
                                              teacher=TeacherSettings(load=sdir), opd=OPDSettings("k1")))
    same = sampled.forward(batch, advantages=zeros)                  # ... and so is every k1 penalty
    res["same"] = vars(same)
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    mask = pad([torch.tensor(m, dtype=torch.float32) for m in batch.loss_masks])
    adv, kl = apply_opd(pad(zeros), pad(same.logprobs), pad(same.teacher_logprobs), coef=1.0, response_mask=mask)
    res["same_penalty"] = {"advantages": adv, "kl": kl}
    return res


def fused_forward(spec: dict, out: str) -> dict:
    """The OPD forward dispatches opd_kernels' fused op once per chunk of token rows (a profiler trace; the default
    chunk holds a whole micro-batch at V = 256, 16-row chunks split them) and equals the unfused path:
    token_logprobs of both models, then algo.apply_opd."""
    from collections import Counter

    from opd_train.algo import apply_opd
    tdir = f"{out}/teacher_ckpt"                        # written by the teacher scenario (iterations 3 and 7)
    batch = make_batch(27, 7)
    base = per_sample_noise(list(range(7)), batch.response_lengths, 5)
    settings = dict(model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=0.9,
                    batching=BatchingSettings(max_tokens_per_microbatch=64))
    res = {"batch": _batch_dict(batch), "base": base, "microbatches": len(pack_microbatches(batch, 64))}
    for estimator in ("k1", "k3"):
        opd = OPDSettings(estimator=estimator, advantage_coef=0.6)
        megatron = MegatronTrainer(TrainerSettings(**settings, teacher=TeacherSettings(load=tdir), opd=opd))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused = megatron.forward(batch, advantages=base)
        ops = Counter(e.name for e in prof.events() if e.name.startswith("opd_kernels::"))
        unfused_student = megatron.forward(batch).logprobs             # the plain path: token_logprobs
        sglang = MegatronTrainer(TrainerSettings(**settings, opd=opd))  # the same teacher numbers, sent as rows
        rows = sglang.forward(batch, advantages=base, teacher=TeacherRows(logprobs=fused.teacher_logprobs))
        pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
        # every response token (padding of the [B, T] layout aside): the loss mask applies later, in the loss
        adv, kl = apply_opd(pad(base), pad(unfused_student), pad(fused.teacher_logprobs), coef=0.6, kl=estimator)
        res[estimator] = {"ops": dict(ops), "fused": vars(fused), "rows": vars(rows),
                          "unfused_student": unfused_student, "unfused_advantages": adv, "unfused_kl": kl}
        del megatron, sglang
    # chunks of 16 scoring rows (prompt rows skip the output layer): the fused op runs once per chunk of each
    # micro-batch's response rows, with the same results
    chunked = MegatronTrainer(TrainerSettings(**{**settings, "batching": BatchingSettings(
        max_tokens_per_microbatch=64, fused_linear_chunk_tokens=16)}, teacher=TeacherSettings(load=tdir),
        opd=OPDSettings(estimator="k1", advantage_coef=0.6)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        res["chunked"] = vars(chunked.forward(batch, advantages=base))
    res["chunked_ops"] = dict(Counter(e.name for e in prof.events() if e.name.startswith("opd_kernels::")))
    res["chunks"] = sum(-(-int((mb.targets != IGNORE_INDEX).sum()) // 16) for mb in pack_microbatches(batch, 64))
    return res


def _fused_or_materialised(spec: dict, tp: int, fused: bool, chunk: int | None) -> dict:
    """One trainer per path: the OPD forward (exact KL, Megatron teacher), then two train steps (entropy bonus +
    exact-KL loss; token mean + the top-K KL of an SGLang-style teacher's rows)."""
    batch = make_batch(71, 5)
    zeros = [torch.zeros(r) for r in batch.response_lengths]
    batching = BatchingSettings(max_tokens_per_microbatch=48, fused_output_layer=fused, fused_linear_chunk_tokens=chunk)
    source = ModelSource(hf_path=spec["hf"]["qwen3_tied"])           # tied embeddings: the head IS the embedding
    trainer = MegatronTrainer(TrainerSettings(
        model=source, temperature=0.9, parallel=ParallelSettings(tensor_parallel=tp), batching=batching,
        optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.5), teacher=TeacherSettings(load=spec["hf"]["teacher_tp"]),
        opd=OPDSettings(estimator=None, advantage_coef=0.0, loss_coef=0.7)))
    f = trainer.forward(batch, advantages=zeros)
    plain = trainer.forward(batch, with_entropy=True)
    adv = per_sample_noise(list(range(5)), batch.response_lengths, 3)
    m1 = trainer.train_step(batch, adv, f.logprobs, loss=LossSettings(entropy_coef=0.01))
    ids = [torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(i * 100 + j))[:8]
                        for j in range(r)]) for i, r in enumerate(batch.response_lengths)]
    lps = [torch.log_softmax(torch.randn(r, 8, generator=torch.Generator().manual_seed(i)), -1) - 0.5
           for i, r in enumerate(batch.response_lengths)]
    rows = TeacherRows(logprobs=[torch.zeros(r) for r in batch.response_lengths], topk_ids=ids, topk_logprobs=lps)
    trainer.teacher = None                     # the same trainer, now with an SGLang teacher's top-K rows
    m2 = trainer.train_step(batch, adv, f.logprobs, teacher=rows, loss=LossSettings(reduction="token_mean"))
    return {"forward": vars(f), "plain": vars(plain), "m1": m1, "m2": m2, "weights": trainer.actor_hf_tensors()}


def fused_vs_materialised(spec: dict, out: str) -> dict | None:
    """The fused output layer (default chunk; 7-row chunks) and the materialised logits path, same steps, same TP
    (1 in the single-process launch, 2 in the 2-process one: per-rank files)."""
    tp = dist.get_world_size()
    if tp > 1:
        init_distributed(rank=dist.get_rank(), world_size=tp, tensor_parallel=tp)
    res = {name: _fused_or_materialised(spec, tp, fused, chunk)
           for name, fused, chunk in (("materialised", False, None), ("fused", True, None), ("fused_7", True, 7))}
    if tp == 1:
        return res
    torch.save(res, f"{out}/fused_vs_materialised_tp{tp}_rank{dist.get_rank()}.pt")
    return None


def kl_loss(spec: dict, out: str) -> dict:
    """The exact-KL loss with the Megatron teacher, and with the teacher's full distribution sent as top-K rows
    (K = V: an SGLang teacher's full distribution)."""
    import transformers
    temp, tdir = 0.8, f"{out}/teacher_ckpt"            # written by the teacher scenario (iterations 3 and 7)
    batch = make_batch(23, 4)
    with_teacher = MegatronTrainer(TrainerSettings(
        model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=temp, teacher=TeacherSettings(load=tdir),
        optimizer=OptimizerSettings(lr=3e-3), opd=EXACT))
    zeros = [torch.zeros(r) for r in batch.response_lengths]
    f = with_teacher.forward(batch, advantages=zeros)
    res = {"batch": _batch_dict(batch), "forward_kl": f.opd_kl}
    res["m_teacher"] = with_teacher.train_step(batch, zeros, f.logprobs)
    res["w_teacher"] = with_teacher.actor_hf_tensors()
    res["later_kl"] = [with_teacher.train_step(batch, zeros, f.logprobs)["opd_kl"] for _ in range(4)]
    hf_teacher = transformers.AutoModelForCausalLM.from_pretrained(spec["hf"]["teacher_b"], dtype=torch.float32)
    ids, lps, tlp = [], [], []
    with torch.no_grad():
        for toks, r in zip(batch.tokens, batch.response_lengths):
            logits = hf_teacher(torch.tensor([toks])).logits[0, len(toks) - r - 1: len(toks) - 1]
            vals, top = torch.log_softmax(logits.double() / temp, -1).topk(logits.shape[-1], -1)
            ids.append(top)
            lps.append(vals.float())
            tlp.append(vals.gather(-1, top.argsort(-1))[torch.arange(r), torch.tensor(toks[len(toks) - r:])].float())
    rows = TeacherRows(logprobs=tlp, topk_ids=ids, topk_logprobs=lps)
    sglang = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=spec["hf"]["qwen3"]), temperature=temp,
                                             optimizer=OptimizerSettings(lr=3e-3), opd=EXACT))
    res["forward_kl_rows"] = sglang.forward(batch, advantages=zeros, teacher=rows).opd_kl
    res["m_rows"] = sglang.train_step(batch, zeros, f.logprobs, teacher=rows)
    res["w_rows"] = sglang.actor_hf_tensors()
    return res


# ---- reference model, critic, bf16 ----------------------------------------------------------------------------
def _critic_settings(source: ModelSource, **checkpoint) -> TrainerSettings:
    # The critic uses Megatron's non-distributed optimizer (the actor the distributed one): both get resumed.
    return TrainerSettings(model=source, reference=source, optimizer=OptimizerSettings(lr=1e-3),
                           checkpoint=CheckpointSettings(**checkpoint),
                           critic=CriticSettings(source=source, optimizer=OptimizerSettings(
                               lr=3e-3, clip_grad=0.0, use_distributed_optimizer=False)))


def critic(spec: dict, out: str) -> dict:
    source = ModelSource(hf_path=spec["hf"]["qwen3"])
    trainer = MegatronTrainer(_critic_settings(source))
    batch = make_batch(41, 4)
    f = trainer.forward(batch, ref=True, values=True)
    actor_before = trainer.actor_hf_tensors()
    returns = [torch.full((r,), 0.5) + 0.1 * n for r, n in
               zip(batch.response_lengths, per_sample_noise(list(range(4)), batch.response_lengths, 9))]
    value_loss = LossSettings(value_clip=None)
    losses = [trainer.train_critic_step(batch, returns, f.values, loss=value_loss)["value_loss"] for _ in range(6)]
    actor_after = trainer.actor_hf_tensors()
    res = {"logprobs": f.logprobs, "ref_logprobs": f.ref_logprobs, "values": f.values, "value_losses": losses,
           "actor_unchanged": all(torch.equal(actor_before[k], actor_after[k]) for k in actor_before)}
    m = trainer.train_step(batch, per_sample_noise(list(range(4)), batch.response_lengths, 3), f.logprobs,
                           ref_logprobs=f.ref_logprobs, loss=LossSettings(ref_kl_coef=0.1))
    res["ref_kl_metrics"] = m
    res["values_after"] = trainer.forward(batch, values=True, actor=False).values
    trainer.save_checkpoint(f"{out}/critic_ckpt")
    res["critic_iterations"] = ckpt.list_iterations(f"{out}/critic_ckpt/critic")
    resumed = MegatronTrainer(_critic_settings(source, load=f"{out}/critic_ckpt"))
    res["resumed_values"] = resumed.forward(batch, values=True, actor=False).values
    res["next_loss"] = [t.train_critic_step(batch, returns, f.values, loss=value_loss)["value_loss"]
                        for t in (trainer, resumed)]
    res["next_values"] = [t.forward(batch, values=True, actor=False).values for t in (trainer, resumed)]
    del trainer, resumed
    bf16 = MegatronTrainer(TrainerSettings(model=source, precision=PrecisionSettings(dtype="bf16"),
                                           optimizer=OptimizerSettings(lr=1e-2)))
    w0 = bf16.actor_hf_tensors()
    fb = bf16.forward(batch)
    res["bf16_metrics"] = bf16.train_step(batch, per_sample_noise(list(range(4)), batch.response_lengths, 4),
                                          fb.logprobs)
    w1 = bf16.actor_hf_tensors()
    res["bf16_dtype"] = str(next(iter(w1.values())).dtype)
    res["bf16_changed"] = sum(not torch.equal(w0[k], w1[k]) for k in w0) / len(w0)
    res["bf16_logprobs"] = fb.logprobs
    return res


# ---- real vocabulary sizes ------------------------------------------------------------------------------------
BIG_VOCABS = {"v49152": ("big_49152", "big_teacher_49152"),           # SmolLM2 / Llama-family tokenizers
              "v151936": ("big_151936", "big_teacher_152064")}         # Qwen: a 151936-row student, 152064 teacher


def big_vocab(spec: dict, out: str) -> dict:
    """The trainer's fused paths at real vocabulary sizes: the Megatron teacher's exact KL (V = 49152; V = 151936
    with a teacher padded to 152064, as Qwen's 7B / 14B embeddings are) and an SGLang teacher's top-K rows, through
    forward (opd_kernels.fused_linear_opd_advantages: chunked logits -> opd_advantages) and train steps
    (fused_linear_logprobs: exact / top-K KL in the loss, from hidden states + heads; the default fused output
    layer, whose chunk at V = 151936 is 110 rows, so micro-batches of 32 tokens are one chunk each), against the
    float64 KL of the HF models' logits."""
    import transformers

    from opd_kernels.ops.reverse_kl import reverse_kl_reference
    res = {}
    for name, (student, teacher) in BIG_VOCABS.items():
        batch = make_batch(61, 3, min_len=10, max_len=18)
        zeros = [torch.zeros(r) for r in batch.response_lengths]
        settings = dict(model=ModelSource(hf_path=spec["hf"][student]), optimizer=OptimizerSettings(lr=3e-3),
                        batching=BatchingSettings(max_tokens_per_microbatch=32))
        trainer = MegatronTrainer(TrainerSettings(**settings, teacher=TeacherSettings(load=spec["hf"][teacher]),
                                                  opd=EXACT))
        f = trainer.forward(batch, advantages=zeros)
        hs = transformers.AutoModelForCausalLM.from_pretrained(spec["hf"][student], dtype=torch.float32)
        ht = transformers.AutoModelForCausalLM.from_pretrained(spec["hf"][teacher], dtype=torch.float32)
        exact, ids, lps, tlp = [], [], [], []
        with torch.no_grad():
            for toks, r in zip(batch.tokens, batch.response_lengths):
                span = slice(len(toks) - r - 1, len(toks) - 1)
                ls, lt = hs(torch.tensor([toks])).logits[0, span], ht(torch.tensor([toks])).logits[0, span]
                exact.append(reverse_kl_reference(ls.double(), lt[:, :ls.shape[-1]].double()).float())
                t_lp = torch.log_softmax(lt[:, :ls.shape[-1]].double(), -1)
                vals, top = t_lp.topk(32, -1)
                ids.append(top)
                lps.append(vals.float())
                tlp.append(t_lp[torch.arange(r), torch.tensor(toks[len(toks) - r:])].float())
        kls = [trainer.train_step(batch, zeros, f.logprobs)["opd_kl"] for _ in range(4)]
        rows = TeacherRows(logprobs=tlp, topk_ids=ids, topk_logprobs=lps)
        sglang = MegatronTrainer(TrainerSettings(**settings, opd=EXACT))
        f_rows = sglang.forward(batch, advantages=zeros, teacher=rows)
        rows_kls = [sglang.train_step(batch, zeros, f_rows.logprobs, teacher=rows)["opd_kl"] for _ in range(4)]
        res[name] = {"vocab": hs.config.vocab_size, "teacher_vocab": ht.config.vocab_size,
                     "forward_kl": f.opd_kl, "exact": exact, "train_kl": kls, "topk_forward_kl": f_rows.opd_kl,
                     "topk_train_kl": rows_kls, "loss_masks": batch.loss_masks}
        del trainer, sglang, hs, ht
    return res
