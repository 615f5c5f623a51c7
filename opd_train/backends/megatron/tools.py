"""HF <-> torch_dist conversion entry points (used by ``tools/convert_hf_to_torch_dist.py``).

Both run in an already-initialised process group (any TP size; :func:`run_conversion` sets up a 1-process
gloo/nccl group for the command line). The torch_dist output is a regular checkpoint of ours (iteration
``step``, model weights only, the HF config and tokenizer files stored inside), loadable as a student
(``ModelSource(checkpoint=...)``), a resume point without optimizer state, or a Megatron teacher.
"""
from __future__ import annotations

import os

from . import checkpoint as ckpt
from ...hf import read_config
from .arch import arch_from_hf_config
from .cpu_compat import cpu_compat
from .dist import current_context
from .engine import ModelEngine
from .hf_io import write_hf_dir
from .model import DTYPES


def convert_hf_to_torch_dist(hf_dir: str, save_dir: str, *, step: int = 0, dtype: str = "fp32") -> str:
    """Collective: read a HF model dir and save it as iteration ``step`` of a torch_dist checkpoint dir."""
    with cpu_compat():
        ctx = current_context()
        engine = ModelEngine(arch_from_hf_config(read_config(hf_dir)), ctx, dtype=dtype, name="converted")
        engine.load_hf(hf_dir)
        meta = {"has_optimizer": False, "tensor_parallel": ctx.tp_size, "data_parallel": ctx.dp_size,
                "dtype": dtype, "role": "converted", "source": os.path.abspath(hf_dir)}
        return ckpt.save(save_dir, step, engine.state_dict_for_save(False, {"step": step}), arch=engine.arch,
                         meta=meta, tokenizer_src=hf_dir)


def convert_torch_dist_to_hf(load_dir: str, hf_dir: str, *, step: int | None = None,
                             dtype: str | None = None) -> str:
    """Collective: load iteration ``step`` (default: latest) of a torch_dist checkpoint and write a HF dir."""
    with cpu_compat():
        ctx = current_context()
        step = ckpt.resolve_iteration(load_dir, step)
        stored_dtype = ckpt.read_meta(load_dir, step).get("dtype", "fp32")
        engine = ModelEngine(ckpt.read_arch(load_dir, step), ctx, dtype=stored_dtype, name="converted")
        engine.load_model_checkpoint(load_dir, step)
        tensors = engine.hf_tensors()
        if ctx.rank == 0:
            write_hf_dir(tensors, engine.arch.hf_config, hf_dir, tokenizer_src=engine.tokenizer_src,
                         dtype=DTYPES[dtype] if dtype else None)
        return hf_dir


def check_conversion(direction: str, src: str, step: int | None, dtype: str | None) -> None:
    """Cheap checks before any process group or model: clear errors naming the argument and the fix."""
    if direction not in ("hf2dist", "dist2hf"):
        raise ValueError(f"direction {direction!r}: use hf2dist (HF dir -> torch_dist) or dist2hf")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype {dtype!r}: use one of {tuple(DTYPES)}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source {src!r} is not a directory")
    if direction == "hf2dist":
        arch_from_hf_config(read_config(src))          # supported family, sane config
        if not any(n.endswith(".safetensors") for n in os.listdir(src)):
            raise FileNotFoundError(f"{src!r} has no *.safetensors weights")
        if step is not None and step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
    else:
        ckpt.read_arch(src, ckpt.resolve_iteration(src, step))


def run_conversion(direction: str, src: str, dst: str, *, step: int | None, dtype: str | None,
                   master_port: int = 29511) -> str:
    """Single-process conversion for the command line (sets up and tears down the process group)."""
    from .dist import destroy_distributed, init_distributed
    check_conversion(direction, src, step, dtype)
    init_distributed(rank=0, world_size=1, master_port=master_port)
    try:
        if direction == "hf2dist":
            return convert_hf_to_torch_dist(src, dst, step=step or 0, dtype=dtype or "fp32")
        return convert_torch_dist_to_hf(src, dst, step=step, dtype=dtype)
    finally:
        destroy_distributed()
