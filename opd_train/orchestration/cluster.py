"""Ray: a local cluster or an existing one (``--ray-address``), and where actors go (CPU or GPU resources).

On a machine without GPUs nothing ever asks Ray for a GPU (an actor requesting one would wait forever). Local
clusters are started with enough *logical* CPU slots for the actors of the run (trainer ranks + the rollout
manager); the actors mostly run one phase at a time, so oversubscribing a small machine's cores is intended.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ClusterConfig
from ..lifecycle import reinstall
from ..observability import log_dir, stderr_to


@dataclass(frozen=True)
class Placement:
    device: str                 # "cpu" | "cuda"
    trainer_bundles: list[dict]  # one bundle per trainer rank

    @property
    def uses_gpus(self) -> bool:
        return self.device == "cuda"


def start_ray(cluster: ClusterConfig, *, min_cpus: int, output_dir: str, verbose: bool = False) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (the caller shuts it down).

    Unless ``verbose``, workers' output stays off the terminal (our actors write theirs to OUTPUT_DIR/logs/) and
    Ray's own log records go wherever the driver routes the "ray" logger (observability.quiet_driver), and what
    its C++ core prints during ray.init to OUTPUT_DIR/logs/driver.log."""
    import ray
    if ray.is_initialized():
        return False
    # Workers inherit Ray's authentication mode (token auth unless RAY_AUTH_MODE says otherwise) from the raylet:
    # overriding it here would make them unable to talk to a cluster that requires the token.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    with stderr_to(None if verbose else os.path.join(log_dir(output_dir), "driver.log")):
        _init(ray, cluster, env, min_cpus, verbose)
    reinstall()                 # ray.init replaced the driver's SIGTERM handling with its own
    return True


def _init(ray, cluster: ClusterConfig, env: dict, min_cpus: int, verbose: bool) -> None:
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, runtime_env=env, log_to_driver=verbose, configure_logging=verbose)
    else:
        # A signal sent to the terminal's process group (`timeout`, a closed terminal) also ends the local cluster's
        # GCS; the driver's clean stop (checkpoint, actors) does not need it, but Ray's core worker then waits 60 s
        # for it at exit. On one machine a GCS gone for 5 s is gone.
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "5")
        cpus = cluster.num_cpus or max(os.cpu_count() or 1, min_cpus)
        ray.init(num_cpus=max(cpus, min_cpus), num_gpus=None if _has_cuda() else 0, include_dashboard=False,
                 runtime_env=env, log_to_driver=verbose, configure_logging=verbose)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def plan_placement(cluster: ClusterConfig, world_size: int) -> Placement:
    """Trainer ranks on GPUs when asked/available in the Ray cluster, else on CPU slots. Clear errors otherwise."""
    import ray
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = cluster.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus < world_size:
        raise RuntimeError(f"the trainer needs {world_size} GPUs (--actor-num-nodes x --actor-num-gpus-per-node) but "
                           f"the Ray cluster has {gpus}; lower them or use --device cpu")
    bundle = {"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1}
    return Placement(device=device, trainer_bundles=[dict(bundle) for _ in range(world_size)])


# Below this many parameters a CPU trainer rank is faster on one thread (the 0.13M-parameter addition toy, 2-core
# machine: train phase 1.02 s per step with one, 1.34 s with two); above, the cores pay (SmolLM2's 124M: 14 -> 10 s).
MULTITHREAD_PARAMS = 20_000_000


def trainer_threads(cluster: ClusterConfig, placement: Placement, model_params: int) -> int | None:
    """torch threads per trainer rank (None: leave Ray's setting). Ray sets OMP_NUM_THREADS=1 in an actor of one
    CPU, so a CPU rank of a real model would run on one core. Rollout and training alternate (the engines idle while
    the trainer steps), so on CPU the ranks share this machine's cores."""
    if cluster.trainer_threads is not None:
        return cluster.trainer_threads
    if placement.device != "cpu" or model_params < MULTITHREAD_PARAMS:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(placement.trainer_bundles))


def trainer_placement_group(placement: Placement):
    """A placement group reserving one bundle per trainer rank (PACK: ranks of a node stay together)."""
    import ray
    from ray.util.placement_group import placement_group
    pg = placement_group(placement.trainer_bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=120)
    return pg


def node_address() -> tuple[str, int]:
    """This process's node IP and a free TCP port on it (rank 0's torch.distributed rendezvous)."""
    import socket

    import ray
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]
