"""Helpers between the trainer and the algorithm layer: per-sample inputs, normalisers, metric reduction."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .packing import MicroBatch, TrainBatch


def per_sample(values, batch: TrainBatch, name: str) -> list[torch.Tensor]:
    """Accept a list of per-sample [R_i] tensors/lists or a right-padded [B, R_max] tensor; return fp32 list.

    Clear ValueError when a sample's length does not match its response length.
    """
    if isinstance(values, torch.Tensor):
        if values.dim() != 2 or values.shape[0] != len(batch):
            raise ValueError(f"{name} must be [B={len(batch)}, R_max] or a list of per-sample tensors, got shape "
                             f"{tuple(values.shape)}")
        if values.shape[1] < max(batch.response_lengths):
            raise ValueError(f"{name} has width {values.shape[1]} < the longest response "
                             f"({max(batch.response_lengths)})")
        return [values[i, :r].detach().float().cpu() for i, r in enumerate(batch.response_lengths)]
    if len(values) != len(batch):
        raise ValueError(f"{name} has {len(values)} entries for a batch of {len(batch)} samples")
    out = []
    for i, (v, r) in enumerate(zip(values, batch.response_lengths)):
        t = torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1)
        if t.numel() != r:
            raise ValueError(f"{name}[{i}] has {t.numel()} entries, the sample's response_length is {r}")
        out.append(t)
    return out


def attach(microbatches: list[MicroBatch], device, **per_sample_inputs: list[torch.Tensor] | None) -> None:
    """Store each input as a right-padded [b, R_max] tensor in ``mb.extras`` (sample order of the micro-batch)."""
    for mb in microbatches:
        for key, values in per_sample_inputs.items():
            if values is not None:
                mb.extras[key] = mb.pad_spans([values[i] for i in mb.sample_ids]).to(device)


def global_count(batch: TrainBatch, reduction: str, given: float | None, dp_group, device) -> float:
    """Samples (sample_mean) or masked-in tokens (token_mean) in the GLOBAL batch (all DP ranks)."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"the global normaliser must be > 0, got {given}")
        return float(given)
    local = len(batch) if reduction == "sample_mean" else batch.num_response_tokens()
    count = torch.tensor([float(local)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=dp_group)
    if count.item() <= 0:
        raise ValueError("the global batch has no masked-in response token: nothing to train on")
    return float(count.item())


def check_same_batch(batch: TrainBatch, tp_group, tp_size: int, device) -> None:
    """All TP ranks of a group must get the same batch; a cheap fingerprint check gives a clear error."""
    if tp_size == 1:
        return
    fingerprint = torch.tensor([len(batch), sum(len(t) for t in batch.tokens),
                                sum(sum(t) for t in batch.tokens) % (2 ** 31), sum(batch.response_lengths)],
                               dtype=torch.int64, device=device)
    high, low = fingerprint.clone(), -fingerprint
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=tp_group)
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=tp_group)
    if not torch.equal(high, -low):
        raise ValueError("the tensor-parallel ranks of one group received different batches; give every TP rank "
                         "of a data-parallel group the same TrainBatch")


SUMMED = ("loss", "pg_loss", "value_loss")   # exact partial sums of the global loss: summed over mbs and ranks


def reduce_metrics(per_mb: list[dict[str, torch.Tensor]], *, scale: float, dp_group, device) -> dict[str, float]:
    """Combine per-micro-batch metrics over micro-batches and DP ranks.

    Loss terms (``SUMMED``) were computed as partial_sum / normaliser; multiplying by ``scale`` =
    normaliser / global_count and summing gives the global value. ``*_min``/``*_max`` take the min/max;
    everything else is a masked-token-weighted mean (the algo layer reports local token means).
    """
    keys = sorted(k for k in per_mb[0] if k != "_ntok")
    ntok = torch.stack([m["_ntok"].double() for m in per_mb])
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    maxes = torch.full((len(keys),), -float("inf"), dtype=torch.float64)
    for j, key in enumerate(keys):
        vals = torch.stack([m[key].double() for m in per_mb])
        if key in SUMMED:
            sums[j] = vals.sum() * scale
        elif key.endswith("_max"):
            maxes[j] = vals.max()
        elif key.endswith("_min"):
            maxes[j] = -vals.min()
        else:
            sums[j] = (vals * ntok).sum()
    sums[-1] = ntok.sum()
    sums, maxes = sums.to(device), maxes.to(device)
    dist.all_reduce(sums, group=dp_group)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=dp_group)
    out, total = {}, max(sums[-1].item(), 1.0)
    for j, key in enumerate(keys):
        if key in SUMMED:
            out[key] = sums[j].item()
        elif key.endswith("_max"):
            out[key] = maxes[j].item()
        elif key.endswith("_min"):
            out[key] = -maxes[j].item()
        else:
            out[key] = sums[j].item() / total
    out["num_tokens"] = sums[-1].item()
    return out
