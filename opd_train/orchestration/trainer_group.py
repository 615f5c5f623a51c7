"""The trainer: a group of Ray actors, one per rank, each running the Megatron backend (DP x TP over gloo / nccl).

:class:`TrainerGroup` is what the training loop talks to. It splits the global batch into optimizer steps
(``--global-batch-size``) and each step's samples over the data-parallel ranks (every TP rank of a DP group gets
the same share, as Megatron requires), calls all ranks concurrently, and puts per-sample results back in batch
order. Normalisers are the GLOBAL counts, so DP=2 computes the same update as DP=1 on the same batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..backends.megatron import LossSettings, TeacherRows, TrainBatch, TrainerSettings
from .cluster import Placement, node_address, trainer_placement_group


def _ray():
    import ray
    return ray


def _log_path(log_dir: str | None, rank: int) -> str | None:
    return None if log_dir is None else os.path.join(log_dir, f"trainer-rank{rank}.log")


class TrainerActor:
    """One trainer rank (wrapped by ``ray.remote`` in :meth:`TrainerGroup.create`). Its output (Megatron's
    notices, warnings) goes to ``log_path`` (None: Ray's default, the terminal with --verbose)."""

    def __init__(self, log_path: str | None = None):
        from ..observability import redirect_output
        redirect_output(log_path)

    def address(self) -> tuple[str, int]:
        return node_address()

    def setup(self, *, rank: int, world_size: int, master: tuple[str, int], settings: TrainerSettings,
              threads: int | None) -> dict:
        from ..serialization import register_fast_tensor_serializer
        register_fast_tensor_serializer()
        if threads:
            torch.set_num_threads(threads)
        from ..backends.megatron import MegatronTrainer, init_distributed
        ctx = init_distributed(rank=rank, world_size=world_size, master_addr=master[0], master_port=master[1],
                               tensor_parallel=settings.parallel.tensor_parallel, seed=settings.seed)
        self.trainer = MegatronTrainer(settings, ctx)
        self.ctx = ctx
        return {"rank": ctx.rank, "dp_rank": ctx.dp_rank, "tp_rank": ctx.tp_rank, "step": self.trainer.step,
                "threads": torch.get_num_threads()}

    def reset(self, settings: TrainerSettings, log_path: str | None) -> int:
        """A fresh trainer (model, optimizer, teacher, resume) in this warm process; same parallel layout."""
        import gc

        from ..backends.megatron import MegatronTrainer
        from ..observability import redirect_output
        redirect_output(log_path)
        self.trainer = None
        gc.collect()
        self.trainer = MegatronTrainer(settings, self.ctx)
        return self.trainer.step

    def forward(self, batch: TrainBatch, kwargs: dict):
        return self.trainer.forward(batch, **kwargs)

    def train_steps(self, steps: list[dict]) -> list[dict]:
        """Optimizer steps in order (this rank's share of each minibatch): critic first (ppo), then the actor."""
        out = []
        for st in steps:
            kw = st["kwargs"]
            metrics = {}
            if st["returns"] is not None:
                critic = self.trainer.train_critic_step(st["batch"], st["returns"], st["old_values"], loss=kw["loss"],
                                                        num_samples=kw["num_samples"], num_tokens=kw["num_tokens"])
                metrics.update({f"critic/{k}": v for k, v in critic.items()})
            metrics.update(self.trainer.train_step(st["batch"], st["advantages"], st["old_logprobs"],
                                                   ref_logprobs=st["ref_logprobs"], teacher=st["teacher"], **kw))
            out.append(metrics)
        return out

    def save_checkpoint(self, directory: str, step: int) -> str:
        return self.trainer.save_checkpoint(directory, step)

    def export_hf(self, directory: str) -> str:
        return self.trainer.export_hf(directory)

    def step(self) -> int:
        return self.trainer.step

    def shutdown(self) -> None:
        from ..backends.megatron import destroy_distributed
        destroy_distributed()


@dataclass
class _Rank:
    actor: object
    rank: int
    dp_rank: int
    tp_rank: int


class TrainerGroup:
    """``world_size`` trainer actors; ``dp_size = world_size / tensor_parallel``."""

    def __init__(self, ranks: list[_Rank], tp: int, placement_group, threads: int):
        self.ranks, self.tp, self.pg = ranks, tp, placement_group
        self.dp = len(ranks) // tp
        self.threads = threads      # torch threads of rank 0, as it reports them

    @classmethod
    def create(cls, settings: TrainerSettings, *, world_size: int, placement: Placement,
               threads_per_rank: int | None = None, log_dir: str | None = None) -> "TrainerGroup":
        """``log_dir``: where each rank writes its output (None: Ray's default)."""
        ray = _ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        pg = trainer_placement_group(placement)
        remote = ray.remote(TrainerActor)
        actors = []
        for i, bundle in enumerate(placement.trainer_bundles):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
            actors.append(remote.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                         scheduling_strategy=strategy, name=None).remote(_log_path(log_dir, i)))
        master = ray.get(actors[0].address.remote())
        infos = ray.get([a.setup.remote(rank=i, world_size=world_size, master=master, settings=settings,
                                        threads=threads_per_rank) for i, a in enumerate(actors)])
        ranks = [_Rank(a, info["rank"], info["dp_rank"], info["tp_rank"]) for a, info in zip(actors, infos)]
        return cls(ranks, settings.parallel.tensor_parallel, pg, infos[0]["threads"])

    def reset(self, settings: TrainerSettings, log_dir: str | None = None) -> None:
        if settings.parallel.tensor_parallel != self.tp:
            raise ValueError("a warm trainer group keeps its tensor-parallel size")
        _ray().get([r.actor.reset.remote(settings, _log_path(log_dir, r.rank)) for r in self.ranks])

    # ---- batch splitting ---------------------------------------------------------------------------------
    def _shares(self, n: int, what: str = "samples") -> list[list[int]]:
        """Positions 0..n-1 of each DP rank: contiguous, as even as possible; an error when a rank gets none."""
        bounds = [round(k * n / self.dp) for k in range(self.dp + 1)]
        shares = [list(range(bounds[k], bounds[k + 1])) for k in range(self.dp)]
        if any(not s for s in shares):
            raise ValueError(f"{what} of {n} samples cannot be split over {self.dp} data-parallel ranks")
        return shares

    @staticmethod
    def _take(values, idx: list[int]):
        if values is None:
            return None
        if isinstance(values, torch.Tensor):
            return values[idx]
        return [values[i] for i in idx]

    @staticmethod
    def _sub_batch(batch: TrainBatch, idx: list[int]) -> TrainBatch:
        return TrainBatch(tokens=[batch.tokens[i] for i in idx],
                          response_lengths=[batch.response_lengths[i] for i in idx],
                          loss_masks=None if batch.loss_masks is None else [batch.loss_masks[i] for i in idx])

    @staticmethod
    def _take_rows(teacher: TeacherRows | None, idx: list[int]) -> TeacherRows | None:
        return None if teacher is None else teacher.take(idx)

    # ---- public API --------------------------------------------------------------------------------------
    def forward(self, batch: TrainBatch, *, advantages=None, teacher: TeacherRows | None = None, **kwargs):
        """Forward-only scoring of the whole batch (``MegatronTrainer.forward``'s arguments; per-sample inputs are
        split with the batch); a ForwardResult in batch order."""
        from ..backends.megatron import ForwardResult
        shares = self._shares(len(batch), "a batch")
        calls = [(self._sub_batch(batch, idx), {**kwargs, "advantages": self._take(advantages, idx),
                                                "teacher": self._take_rows(teacher, idx)}) for idx in shares]
        results = _ray().get([r.actor.forward.remote(*calls[r.dp_rank]) for r in self.ranks])
        per_dp = [res for r, res in zip(self.ranks, results) if r.tp_rank == 0]  # TP ranks return the same
        merged = ForwardResult()
        for name in vars(merged):
            parts = [getattr(res, name) for res in per_dp]
            if parts[0] is not None:
                ordered: list = [None] * len(batch)
                for idx, part in zip(shares, parts):
                    for i, t in zip(idx, part):
                        ordered[i] = t
                setattr(merged, name, ordered)
        return merged

    def train(self, batch: TrainBatch, advantages: list[torch.Tensor], old_logprobs: list[torch.Tensor], *,
              global_batch_size: int, loss: LossSettings, ref_logprobs=None, returns=None, old_values=None,
              teacher: TeacherRows | None = None, shuffle_seed: int = 0) -> dict[str, float]:
        """Optimizer steps over the rollout in minibatches of ``global_batch_size`` samples (a random partition
        seeded by ``shuffle_seed``), each split over the DP ranks; ONE Ray call per rank carries all of them.

        ``teacher``: an SGLang teacher's rows for the OPD KL loss (loss modes; None for the Megatron teacher).
        Returns the metrics averaged over the optimizer steps (critic metrics prefixed ``critic/``).
        """
        # Minibatches are a seeded random partition of the rollout (advantages are already computed per group):
        # measured on the toy task, contiguous minibatches (whole prompt groups) learn markedly slower.
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        per_dp: list[list[dict]] = [[] for _ in range(self.dp)]   # TP ranks of a DP rank get the same steps
        for start in range(0, len(batch), global_batch_size):
            idx = sorted(order[start:start + global_batch_size])
            kwargs = {"loss": loss,
                      "num_samples": float(len(idx)) if loss.reduction == "sample_mean" else None,
                      "num_tokens": float(sum(sum(batch.mask(i)) for i in idx))
                      if loss.reduction == "token_mean" else None}
            for dp_rank, share in enumerate(self._shares(len(idx), "a minibatch")):
                mine = [idx[j] for j in share]
                per_dp[dp_rank].append({
                    "batch": self._sub_batch(batch, mine), "advantages": self._take(advantages, mine),
                    "old_logprobs": self._take(old_logprobs, mine), "ref_logprobs": self._take(ref_logprobs, mine),
                    "teacher": self._take_rows(teacher, mine), "returns": self._take(returns, mine),
                    "old_values": self._take(old_values, mine), "kwargs": kwargs})
        results = _ray().get([r.actor.train_steps.remote(per_dp[r.dp_rank]) for r in self.ranks])
        steps = results[0]                       # metrics are global (reduced over DP inside the backend)
        return {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]} | {"optimizer_steps": len(steps)}

    def save_checkpoint(self, directory: str, step: int) -> str:
        return _ray().get([r.actor.save_checkpoint.remote(directory, step) for r in self.ranks])[0]

    def export_hf(self, directory: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        return _ray().get([r.actor.export_hf.remote(directory) for r in self.ranks])[0]

    def step(self) -> int:
        return _ray().get(self.ranks[0].actor.step.remote())

    def shutdown(self) -> None:
        ray = _ray()
        try:
            ray.get([r.actor.shutdown.remote() for r in self.ranks], timeout=60)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed below anyway
            pass
        for r in self.ranks:
            ray.kill(r.actor)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(self.pg)
