"""Process-group setup for the Megatron backend: torch.distributed + Megatron's parallel_state + RNG seeds.

Usable from a Ray actor or a torch.multiprocessing worker: pass rank/world size/master address explicitly
(nothing is read from the environment unless you leave an argument out). gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cpu_compat import cpu_compat, cuda_absent


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def tp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_group()


def init_distributed(*, rank: int | None = None, world_size: int | None = None, master_addr: str | None = None,
                     master_port: int | None = None, tensor_parallel: int = 1, seed: int = 1234,
                     local_rank: int | None = None, backend: str | None = None,
                     timeout_minutes: int = 30) -> ParallelContext:
    """Initialise torch.distributed (if not already) and Megatron's TP x DP groups; seed Megatron's RNG tracker.

    Missing rank/world_size/master_addr/master_port come from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.
    ``backend`` defaults to nccl when CUDA is available, else gloo. Calling it again (e.g. with another TP
    size) rebuilds Megatron's groups on the existing process group (tests compare TP=2 with DP=2 this way);
    trainers built before must be discarded.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if tensor_parallel < 1 or world_size % tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel} must divide world_size={world_size}")
    use_cuda = not cuda_absent()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())) \
            if local_rank is None else local_rank
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port or int(os.environ.get("MASTER_PORT", 29500))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"torch.distributed is already initialised with world_size={dist.get_world_size()}, "
                           f"not {world_size}")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    with cpu_compat():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 distributed_timeout_minutes=timeout_minutes)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    return current_context()


def current_context() -> ParallelContext:
    from megatron.core import parallel_state as ps
    device = torch.device("cuda", torch.cuda.current_device()) if not cuda_absent() else torch.device("cpu")
    return ParallelContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           tp_rank=ps.get_tensor_model_parallel_rank(),
                           tp_size=ps.get_tensor_model_parallel_world_size(),
                           dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                           device=device)


def destroy_distributed(process_group: bool = True) -> None:
    """Tear down Megatron's groups (and the default process group unless ``process_group=False``)."""
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
