"""Tensor-parallel vocabulary: 2 gloo processes, each holding half the vocabulary, must reproduce the unsharded
ops (values and gradients) for token_logprobs, reverse_kl, topk_kl and opd_advantages, on every CPU backend."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import opd_kernels as ok
from opd_kernels import _backend, use_backend

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
WORLD = 2
VOCAB_PER_RANK = 517  # odd: the shard boundary falls mid-block


def _close(got, expected, what, atol=2e-6, rtol=2e-5):
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _data(dtype, seed):
    gen = torch.Generator().manual_seed(seed)  # identical on every rank
    vocab = WORLD * VOCAB_PER_RANK
    x = torch.randn(3, 6, vocab, generator=gen, dtype=torch.float64) * 2
    x[0, :, 7] += 25  # confident rows whose token sits in rank 0's shard
    x[1, :, vocab - 3] += 25  # ... and in rank 1's
    teacher = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (3, 6), generator=gen)
    tokens[0, :3], tokens[1, :3] = 7, vocab - 3
    ups = torch.randn(2, 3, 6, generator=gen)
    return x.to(dtype), teacher.to(dtype), tokens, ups


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[..., rank * VOCAB_PER_RANK:(rank + 1) * VOCAB_PER_RANK]  # a strided view, as Megatron's would be


def _check_token_logprobs(rank, x, tokens, ups, group):
    tokens = tokens.clone()
    tokens[2, 4] = -100
    full = x.clone().requires_grad_()
    logp, ent = ok.token_logprobs(full, tokens, temperature=0.8, return_entropy=True)
    (logp * ups[0] + ent * ups[1]).sum().backward()
    shard = _shard(x, rank).clone().requires_grad_()
    logp_tp, ent_tp = ok.token_logprobs(shard, tokens, temperature=0.8, return_entropy=True, process_group=group)
    (logp_tp * ups[0] + ent_tp * ups[1]).sum().backward()
    _close(logp_tp, logp, "token_logprobs logp")
    _close(ent_tp, ent, "token_logprobs entropy")
    _close(shard.grad, _shard(full.grad, rank), "token_logprobs grad", atol=1e-2 if x.dtype != torch.float32 else 2e-6)
    shifted = ok.token_logprobs(_shard(x, rank)[:, :-1], tokens[:, 1:], process_group=group)
    _close(shifted, ok.token_logprobs(x[:, :-1], tokens[:, 1:]), "LM-shift view")


def _check_reverse_kl(rank, x, teacher, ups, group):
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2] = False
    full = x.clone().requires_grad_()
    kl = ok.reverse_kl(full, teacher, temperature=1.3, mask=mask)
    (kl * ups[0]).sum().backward()
    shard = _shard(x, rank).clone().requires_grad_()
    kl_tp = ok.reverse_kl(shard, _shard(teacher, rank), temperature=1.3, mask=mask, process_group=group)
    (kl_tp * ups[0]).sum().backward()
    _close(kl_tp, kl, "reverse_kl")
    _close(shard.grad, _shard(full.grad, rank), "reverse_kl grad", atol=1e-2 if x.dtype != torch.float32 else 2e-6)
    same = ok.reverse_kl(_shard(x, rank), _shard(x, rank), process_group=group)
    assert same.abs().max() <= 1e-6, "student == teacher must give zero KL under TP"


def _check_opd_advantages(rank, x, teacher, tokens, ups, group):
    mask = ups[1] > -0.5
    tokens = torch.where(mask, tokens, torch.full_like(tokens, -9))  # masked positions may hold anything
    teacher_lp = ok.token_logprobs(teacher, torch.where(mask, tokens, 0))
    for kl in ("k1", "k2", "k3", "full"):
        extra = {"teacher_logits": teacher} if kl == "full" else {"teacher_logprobs": teacher_lp}
        extra_tp = {"teacher_logits": _shard(teacher, rank)} if kl == "full" else extra
        out = ok.opd_advantages(x, tokens, ups[0], kl=kl, mask=mask, coef=0.7, **extra)
        out_tp = ok.opd_advantages(_shard(x, rank), tokens, ups[0], kl=kl, mask=mask, coef=0.7, process_group=group,
                                   **extra_tp)
        for name, a, b in zip(out._fields, out_tp, out):
            _close(a, b, f"opd_advantages {kl} {name}")


def _teacher_topk(teacher, K=24):
    """The teacher's top-K ids (spread over both shards) and fp32 log-probs, one unused slot, one padded id."""
    vals, ids = torch.log_softmax(teacher.double(), -1).topk(K, -1)
    ids = ids.clone()
    ids[0, 0, -1], ids[2, 1, -2] = -1, WORLD * VOCAB_PER_RANK + 5
    return ids, vals.float()


def _check_topk_kl(rank, x, teacher, tokens, ups, group):
    ids, lq = _teacher_topk(teacher)
    mask = ups[1] > -0.8
    full = x.clone().requires_grad_()
    kl = ok.topk_kl(full, ids, lq, temperature=0.9, mask=mask)
    (kl * ups[0]).sum().backward()
    shard = _shard(x, rank).clone().requires_grad_()
    kl_tp = ok.topk_kl(shard, ids, lq, temperature=0.9, mask=mask, process_group=group)
    (kl_tp * ups[0]).sum().backward()
    _close(kl_tp, kl, "topk_kl")
    _close(shard.grad, _shard(full.grad, rank), "topk_kl grad", atol=1e-2 if x.dtype != torch.float32 else 2e-6)
    out = ok.opd_advantages(x, tokens, ups[0], kl="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lq, mask=mask)
    out_tp = ok.opd_advantages(_shard(x, rank), tokens, ups[0], kl="topk", teacher_topk_ids=ids,
                               teacher_topk_logprobs=lq, mask=mask, process_group=group)
    for name, a, b in zip(out._fields, out_tp, out):
        _close(a, b, f"opd_advantages topk {name}")


def _check_empty_shard(rank, x, teacher, tokens, ups, group):
    """Rows whose whole shard on one rank is -inf (masked or padded vocabulary columns): entropy and KL stay
    finite and equal the unsharded op (0 * -inf at the combine gave NaN)."""
    x, teacher, tokens = x.clone(), teacher.clone(), tokens.clone()
    x[0, :, VOCAB_PER_RANK:] = -torch.inf                       # rank 1 holds no mass of these rows
    teacher[0, :, VOCAB_PER_RANK:] = -torch.inf
    x[1, :, :VOCAB_PER_RANK] = -torch.inf                       # rank 0 holds none of the student's mass
    tokens[0] = tokens[0] % VOCAB_PER_RANK
    tokens[1] = VOCAB_PER_RANK + tokens[1] % VOCAB_PER_RANK
    full = x.clone().requires_grad_()
    logp, ent = ok.token_logprobs(full, tokens, return_entropy=True)
    kl = ok.reverse_kl(full, teacher)
    (logp * ups[0] + ent * ups[1] + kl).sum().backward()
    shard = _shard(x, rank).clone().requires_grad_()
    logp_tp, ent_tp = ok.token_logprobs(shard, tokens, return_entropy=True, process_group=group)
    kl_tp = ok.reverse_kl(shard, _shard(teacher, rank), process_group=group)
    (logp_tp * ups[0] + ent_tp * ups[1] + kl_tp).sum().backward()
    assert bool(torch.isfinite(ent_tp).all()) and bool(torch.isfinite(kl_tp[0]).all())
    _close(logp_tp, logp, "empty shard logp")
    _close(ent_tp, ent, "empty shard entropy")
    _close(kl_tp, kl, "empty shard kl")
    _close(shard.grad, _shard(full.grad, rank), "empty shard grad", atol=1e-2 if x.dtype != torch.float32 else 2e-6)


def _worker(rank: int, init_file: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        for name in backends:
            with use_backend(name):
                for dtype, seed in ((torch.float32, 1), (torch.bfloat16, 2)):
                    x, teacher, tokens, ups = _data(dtype, seed)
                    _check_token_logprobs(rank, x, tokens, ups, group)
                    _check_reverse_kl(rank, x, teacher, ups, group)
                    _check_opd_advantages(rank, x, teacher, tokens, ups, group)
                    _check_topk_kl(rank, x, teacher, tokens, ups, group)
                    _check_empty_shard(rank, x, teacher, tokens, ups, group)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_equals_unsharded(tmp_path):
    backends = [b for b in ("torch", "cpp", "triton") if _backend.available(b, "cpu")]
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), backends), nprocs=WORLD, join=True)


def test_process_group_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ok.token_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), process_group=object())


def test_single_rank_group_equals_unsharded(tmp_path):
    """A one-process gloo group exercises the all-reduce path in-process (fast, and debuggable)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'single'}", rank=0, world_size=1)
    try:
        x, teacher, tokens, ups = _data(torch.float32, 3)
        with use_backend(_backend.resolve("cpu")):
            _close(ok.token_logprobs(x, tokens, process_group=dist.group.WORLD), ok.token_logprobs(x, tokens), "1 rank")
            _close(ok.reverse_kl(x, teacher, process_group=dist.group.WORLD), ok.reverse_kl(x, teacher), "1 rank")
    finally:
        dist.destroy_process_group()
