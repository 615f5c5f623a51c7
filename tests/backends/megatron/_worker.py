"""Worker process of the Megatron tests: runs named scenarios (``_scenarios.py``) and saves their results.

    python _worker.py --world N --port P --out DIR --spec SPEC.json scenario [scenario ...]

With ``--world 2`` it spawns two gloo ranks. Each scenario writes ``DIR/<name>.pt`` (rank 0, or
``<name>_rank<r>.pt`` when it returns per-rank results) or ``DIR/<name>.err`` with its traceback, and the next
scenario still runs. The ``__main__`` guard matters: Megatron's checkpoint writer spawns a helper process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))


def _run(rank: int, world: int, port: int, out: str, spec: dict, scenarios: list[str]) -> None:
    import torch
    import _scenarios
    from opd_train.backends.megatron import init_distributed
    torch.set_num_threads(1)
    init_distributed(rank=rank, world_size=world, master_port=port, tensor_parallel=1)
    for name in scenarios:
        for stale in (f"{name}.pt", f"{name}.err") if rank == 0 else (f"{name}_rank{rank}.err",):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        try:
            result = getattr(_scenarios, name)(spec, out)
            if result is not None and rank == 0:
                torch.save(result, os.path.join(out, f"{name}.pt"))
        except Exception:  # noqa: BLE001  (reported to the test through the .err file)
            with open(os.path.join(out, f"{name}.err" if rank == 0 else f"{name}_rank{rank}.err"), "w") as f:
                f.write(traceback.format_exc())


def _spawned(rank: int, world: int, port: int, out: str, spec: dict, scenarios: list[str]) -> None:
    _run(rank, world, port, out, spec, scenarios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("scenarios", nargs="+")
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    if args.world == 1:
        _run(0, 1, args.port, args.out, spec, args.scenarios)
        return
    import torch.multiprocessing as mp
    mp.start_processes(_spawned, args=(args.world, args.port, args.out, spec, args.scenarios),
                       nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
