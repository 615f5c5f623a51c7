#!/usr/bin/env python
"""Convert HuggingFace safetensors <-> Megatron torch_dist checkpoints (Qwen3, Qwen2, Llama).

    # HF -> torch_dist (iteration 0 of DIST_DIR; the HF config and tokenizer files are stored inside)
    python tools/convert_hf_to_torch_dist.py --hf-checkpoint /models/Qwen3-8B --save /ckpt/Qwen3-8B_torch_dist
    # torch_dist -> HF (the latest iteration, or --ckpt-step N)
    python tools/convert_hf_to_torch_dist.py --load /ckpt/run --ckpt-step 20 --hf-save /models/run-step20

The architecture is read from the HF config (stored inside our checkpoints), so no Megatron model flags are
needed. Same code as ``opd-train convert``; runs in one process (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", help="HF model dir to convert to torch_dist (needs --save)")
    p.add_argument("--save", help="torch_dist checkpoint dir to write")
    p.add_argument("--load", help="torch_dist checkpoint dir to convert to HF (needs --hf-save)")
    p.add_argument("--hf-save", help="HF model dir to write")
    p.add_argument("--ckpt-step", type=int, default=None,
                   help="iteration: written with --save (default 0), read with --load (default: the latest)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights dtype (default: fp32 / stored)")
    p.add_argument("--master-port", type=int, default=29511)
    ns = p.parse_args(argv)
    if bool(ns.hf_checkpoint) == bool(ns.load):
        p.error("give either --hf-checkpoint DIR --save DIR (HF -> torch_dist) or --load DIR --hf-save DIR")
    if ns.hf_checkpoint and not ns.save:
        p.error("--hf-checkpoint needs --save (the torch_dist directory to write)")
    if ns.load and not ns.hf_save:
        p.error("--load needs --hf-save (the HF directory to write)")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    from opd_train.backends.megatron.tools import run_conversion
    direction, src, dst = ("hf2dist", ns.hf_checkpoint, ns.save) if ns.hf_checkpoint else \
        ("dist2hf", ns.load, ns.hf_save)
    try:
        out = run_conversion(direction, src, dst, step=ns.ckpt_step, dtype=ns.dtype, master_port=ns.master_port)
    except (ValueError, FileNotFoundError) as exc:
        print(f"convert_hf_to_torch_dist: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
