"""HuggingFace directory I/O: lazy safetensors reading, atomic export (weights + config + tokenizer files)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Files of a HF model directory that are not weights and that rollout engines need next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
MAX_SHARD_BYTES = 4 * 1024 ** 3


class HFWeights:
    """Reads tensors of a HF directory lazily (single ``model.safetensors`` or an index of shards)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory!r} has no *.safetensors weights (only safetensors HF "
                                        "checkpoints are supported; convert .bin files with transformers first)")
            self.file_of = {}
            for name in files:
                with safe_open(os.path.join(directory, name), framework="pt") as f:
                    self.file_of.update({k: os.path.join(directory, name) for k in f.keys()})
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of.get(name)
        if path is None:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint {self.directory!r}")
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)


def fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tokenizer_files(src: str | None, dst: str) -> list[str]:
    """Copy the tokenizer/generation files present in ``src`` to ``dst``; returns the names copied."""
    copied = []
    if src is None or not os.path.isdir(src):
        return copied
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _write_weights(tensors: dict[str, torch.Tensor], directory: str) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_hf_dir(tensors: dict[str, torch.Tensor], hf_config: dict, directory: str, *,
                 tokenizer_src: str | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a complete HF model directory atomically: build it in a sibling temp dir, fsync, then swap it in.

    A reader of ``directory`` sees either the previous complete export or the new one, never a partial one
    (an existing directory is moved aside, the new one renamed in, the old one deleted).
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        _write_weights({k: v.contiguous() for k, v in tensors.items()}, tmp)
        config = dict(hf_config)
        some = next(iter(tensors.values()))
        config["torch_dtype"] = config["dtype"] = str(some.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        copy_tokenizer_files(tokenizer_src, tmp)
        fsync_tree(tmp)
        swap_in(tmp, directory)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: str, final: str) -> None:
    """Atomically publish directory ``tmp`` as ``final`` (same filesystem), replacing any previous ``final``."""
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
