"""Loading new weights from an HF safetensors directory into a live model, all-or-nothing.

Everything is read and checked (architecture fields of ``config.json``, tensor names, shapes) before the first
parameter is overwritten, so a failed update leaves the served weights untouched (SGLang behaves the same: see the
``update_weights_from_disk_bad_path`` / ``score_single_start0_after_bad_update`` captures).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

# config.json fields that must match for the weights to mean the same thing in the served architecture.
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings")


class WeightUpdateError(ValueError):
    pass


def safetensors_files(model_path: str) -> list[str]:
    if not os.path.isdir(model_path):
        raise WeightUpdateError(f"Failed to get weights iterator: model_path {model_path!r} is not a directory. "
                                f"Pass the HF directory the trainer exported (config.json + *.safetensors).")
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
    if not names:
        raise WeightUpdateError(f"Failed to get weights iterator: no *.safetensors file in {model_path!r} (this "
                                f"engine loads safetensors only; save with safe_serialization=True).")
    return [os.path.join(model_path, n) for n in names]


def _check_config(model_path: str, config) -> None:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return  # a bare safetensors directory: names and shapes are still checked
    with open(path) as f:
        new = json.load(f)
    for field in _ARCH_FIELDS:
        ours = getattr(config, field, None)
        if field in new and ours is not None and new[field] != ours:
            raise WeightUpdateError(f"{model_path}/config.json has {field}={new[field]!r} but the served model has "
                                    f"{field}={ours!r}: update_weights_from_disk only swaps weights of the same "
                                    f"architecture; start a new server for a different model.")


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """Names sharing storage (tied embeddings): loading any one of them fills all."""
    by_ptr: dict[int, set[str]] = {}
    for name, t in state.items():
        by_ptr.setdefault(t.data_ptr(), set()).add(name)
    return {name: by_ptr[t.data_ptr()] for name, t in state.items()}


def load_state_from_disk(model: torch.nn.Module, config, model_path: str) -> None:
    files = safetensors_files(model_path)
    _check_config(model_path, config)
    loaded: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded.update(load_file(path))
        except Exception as exc:  # safetensors raises several types for truncated / foreign files
            raise WeightUpdateError(f"Failed to read {path}: {exc}") from exc
    apply_state(model, loaded, source=model_path)


def apply_state(model: torch.nn.Module, loaded: dict[str, torch.Tensor], *, source: str = "tensors") -> None:
    """Copy ``loaded`` into ``model`` after checking names and shapes; raises before changing anything."""
    target = model.state_dict()
    aliases = _aliases(target)
    unexpected = sorted(set(loaded) - set(target))
    if unexpected:
        raise WeightUpdateError(f"{source} has tensors the served model does not: {unexpected[:5]}"
                                f"{' ...' if len(unexpected) > 5 else ''} (different architecture or naming?).")
    missing = sorted(n for n in target if not (aliases[n] & set(loaded)))
    if missing:
        raise WeightUpdateError(f"{source} lacks tensors of the served model: {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}.")
    for name, t in loaded.items():
        if tuple(t.shape) != tuple(target[name].shape):
            raise WeightUpdateError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the served model "
                                    f"expects {tuple(target[name].shape)}.")
    with torch.no_grad():
        for name, t in loaded.items():
            target[name].copy_(t)
