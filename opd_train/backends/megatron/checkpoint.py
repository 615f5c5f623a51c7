"""Self-describing, atomic Megatron ``torch_dist`` checkpoints.

Layout (Megatron's)::

    DIR/latest_checkpointed_iteration.txt      # "10"
    DIR/iter_0000010/                          # torch_dist shards (.metadata, __*_*.distcp, common.pt, ...)
    DIR/iter_0000010/hf/config.json            # the HF config of the architecture (+ tokenizer files)
    DIR/iter_0000010/opd_checkpoint.json       # step, TP/DP layout, dtype, whether optimizer state is inside

Atomicity: every rank writes its shards into ``DIR/.tmp_iter_0000010-<nonce>/``; once all ranks are done,
rank 0 writes the metadata, fsyncs the tree, renames the temp dir to ``iter_0000010`` and then replaces the
tracker file atomically (write + fsync + ``os.replace``). A crash at any point leaves the tracker pointing at
the previous complete iteration, which stays loadable; stale temp dirs are removed by the next save.

Architecture: the HF config stored in each iteration lets a model of any size (e.g. a teacher larger than
the student) be rebuilt from the checkpoint alone (:func:`read_arch`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid

import torch.distributed as dist

from .arch import ModelArch, arch_from_hf_config
from .hf_io import copy_tokenizer_files, fsync_dir, swap_in, fsync_tree

TRACKER = "latest_checkpointed_iteration.txt"
META = "opd_checkpoint.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# Megatron 0.19's "fully_reshardable" optimizer layout fails to reload torch Adam's per-parameter "step"
# tensor (KeyError 'step'); "dp_reshardable" round-trips it but needs the same TP x DP layout on resume.


def iteration_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"iter_{step:07d}")


def list_iterations(directory: str) -> list[int]:
    """Complete iterations present in ``directory`` (those with our metadata file), ascending."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        match = _ITER_RE.match(name)
        if match and os.path.isfile(os.path.join(directory, name, META)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def has_checkpoint(directory: str | None) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, TRACKER))


def resolve_iteration(directory: str, step: int | None = None) -> int:
    """The iteration to load: ``step`` if given (must exist), else the tracker's. Clear errors otherwise."""
    available = list_iterations(directory)
    if step is not None:
        if step not in available:
            raise FileNotFoundError(f"checkpoint iteration {step} not found in {directory!r}; available "
                                    f"iterations: {available or 'none'}")
        return step
    tracker = os.path.join(directory, TRACKER)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"{directory!r} is not a checkpoint directory (no {TRACKER}); available "
                                f"iterations: {available or 'none'}")
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit() or int(text) not in available:
        foreign = text.isdigit() and os.path.isdir(iteration_dir(directory, int(text)))
        hint = (f" ({iteration_dir(directory, int(text))} exists but has no {META}: a checkpoint not written by "
                "opd, e.g. Megatron-LM's own or legacy 'torch' format, whose architecture is unknown; convert the "
                "HF model with tools/convert_hf_to_torch_dist.py instead)") if foreign else ""
        raise FileNotFoundError(f"{tracker} names iteration {text!r}, which is not a complete checkpoint{hint}; "
                                f"available iterations: {available or 'none'}")
    return int(text)


def read_meta(directory: str, step: int) -> dict:
    with open(os.path.join(iteration_dir(directory, step), META)) as f:
        return json.load(f)


def read_arch(directory: str, step: int | None = None) -> ModelArch:
    """The architecture stored with a checkpoint iteration (default: the latest)."""
    step = resolve_iteration(directory, step)
    with open(os.path.join(iteration_dir(directory, step), "hf", "config.json")) as f:
        return arch_from_hf_config(json.load(f))


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _remove_stale_temps(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith(".tmp_iter_"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _write_shards(state_dict: dict, tmp: str) -> None:
    from megatron.core import dist_checkpointing
    dist_checkpointing.save(state_dict, tmp)


def _write_metadata(tmp: str, step: int, arch: ModelArch, meta: dict, tokenizer_src: str | None) -> None:
    hf_dir = os.path.join(tmp, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(arch.hf_config, f, indent=2, sort_keys=True)
    copy_tokenizer_files(tokenizer_src, hf_dir)
    with open(os.path.join(tmp, META), "w") as f:
        json.dump({"step": step, **meta}, f, indent=2, sort_keys=True)
    fsync_tree(tmp)


def _publish(tmp: str, final: str) -> None:
    swap_in(tmp, final)


def _update_tracker(directory: str, step: int) -> None:
    tracker = os.path.join(directory, TRACKER)
    part = f"{tracker}.tmp-{uuid.uuid4().hex[:8]}"
    with open(part, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tracker)
    fsync_dir(directory)


def save(directory: str, step: int, state_dict: dict, *, arch: ModelArch, meta: dict,
         tokenizer_src: str | None = None) -> str:
    """Collective: save a sharded state dict as iteration ``step`` of ``directory`` (see module docstring)."""
    if _is_rank0():
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temps(directory)
    tmp = _broadcast(os.path.join(directory, f".tmp_iter_{step:07d}-{uuid.uuid4().hex[:8]}") if _is_rank0()
                     else None)
    if _is_rank0():
        os.makedirs(tmp)
    dist.barrier()
    _write_shards(state_dict, tmp)
    dist.barrier()
    final = iteration_dir(directory, step)
    if _is_rank0():
        _write_metadata(tmp, step, arch, meta, tokenizer_src)
        _publish(tmp, final)
        _update_tracker(directory, step)
    dist.barrier()
    return final


def load(directory: str, step: int, state_dict: dict, *, strict: bool = True) -> dict:
    """Collective: load iteration ``step`` into the given sharded state dict template; returns the loaded dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    return dist_checkpointing.load(state_dict, iteration_dir(directory, step),
                                   strict=StrictHandling.RAISE_UNEXPECTED if strict
                                   else StrictHandling.LOG_UNEXPECTED)
