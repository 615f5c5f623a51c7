"""HuggingFace <-> Megatron weights for Qwen3 / Qwen2 / Llama (SPEC section 3), at any tensor-parallel size.

Naming: Megatron tensors are named by their *checkpoint* keys (what ``model.sharded_state_dict()`` and
torch_dist files use, e.g. ``decoder.layers.self_attention.linear_qkv.weight`` with a leading layer axis).
The local and TransformerEngine layer specs share these keys, so CPU and GPU checkpoints are interchangeable.

Mapping per layer i (h = hidden, G = KV groups, H = heads, D = head dim):
  input_layernorm            -> self_attention.linear_qkv.layer_norm_weight
  q/k/v_proj (+ bias)        -> self_attention.linear_qkv: per-KV-group interleave
                                cat([q.view(G, H/G*D, h), k.view(G, D, h), v.view(G, D, h)], 1).reshape(-1, h)
  q_norm / k_norm            -> self_attention.q_layernorm / k_layernorm
  o_proj                     -> self_attention.linear_proj
  post_attention_layernorm   -> mlp.linear_fc1.layer_norm_weight
  cat([gate_proj, up_proj])  -> mlp.linear_fc1
  down_proj                  -> mlp.linear_fc2
  embed_tokens / norm / lm_head -> embedding.word_embeddings / decoder.final_layernorm / output_layer (untied)

Sharding is never hand-coded: :func:`load_weights` fills each rank's parameters through the ShardedTensor
metadata of ``sharded_state_dict()`` (global offsets), and :func:`gather_weights` all-gathers the shards of the
tensor-parallel group back into full tensors, so whatever Megatron does for TP (including the SwiGLU fc1
split) is followed exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .arch import ModelArch

LAYER_PREFIX = "decoder.layers."
_NORM_KEYS = {  # megatron layer key suffix -> HF layer name suffix (one-to-one tensors)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "decoder.final_layernorm.weight": "model.norm.weight",
             "output_layer.weight": "lm_head.weight"}

Fetch = Callable[[str], torch.Tensor]   # HF tensor name -> tensor


def _qkv_to_mcore(arch: ModelArch, q, k, v):
    g, d = arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]   # (h,) for weights, () for biases
    fused = torch.cat([q.reshape(g, arch.heads_per_group * d, *tail), k.reshape(g, d, *tail),
                       v.reshape(g, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def _qkv_from_mcore(arch: ModelArch, fused):
    g, d, hpg = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
    tail = fused.shape[1:]
    grouped = fused.reshape(g, (hpg + 2) * d, *tail)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def mcore_tensor_from_hf(arch: ModelArch, key: str, layer: int | None, fetch: Fetch) -> torch.Tensor:
    """The full (unsharded) Megatron tensor ``key`` (for ``layer`` when it is a per-layer key) from HF tensors."""
    if layer is None:
        if key == "output_layer.weight" and arch.tied_embeddings:
            return fetch("model.embed_tokens.weight")
        if key not in _TOP_KEYS:
            raise KeyError(f"no HF mapping for Megatron tensor {key!r}")
        return fetch(_TOP_KEYS[key])
    suffix = key[len(LAYER_PREFIX):]
    hf = f"model.layers.{layer}."
    if suffix in _NORM_KEYS:
        return fetch(hf + _NORM_KEYS[suffix])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return _qkv_to_mcore(arch, *(fetch(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"))
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([fetch(hf + "mlp.gate_proj.weight"), fetch(hf + "mlp.up_proj.weight")], dim=0)
    raise KeyError(f"no HF mapping for Megatron tensor {key!r}")


def hf_tensors_from_mcore(arch: ModelArch, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict from full Megatron tensors (per-layer keys stacked on a leading layer axis)."""
    out: dict[str, torch.Tensor] = {}
    for key, hf_name in _TOP_KEYS.items():
        if key in full and not (key == "output_layer.weight" and arch.tied_embeddings):
            out[hf_name] = full[key]
    for i in range(arch.num_layers):
        hf = f"model.layers.{i}."
        for suffix, hf_suffix in _NORM_KEYS.items():
            if LAYER_PREFIX + suffix in full:
                out[hf + hf_suffix] = full[LAYER_PREFIX + suffix][i]
        for kind in ("weight", "bias"):
            fused = full.get(f"{LAYER_PREFIX}self_attention.linear_qkv.{kind}")
            if fused is not None:
                for name, t in zip("qkv", _qkv_from_mcore(arch, fused[i])):
                    out[f"{hf}self_attn.{name}_proj.{kind}"] = t
        gate, up = torch.chunk(full[LAYER_PREFIX + "mlp.linear_fc1.weight"][i], 2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def expected_hf_names(arch: ModelArch) -> set[str]:
    """The HF tensor names a model of this architecture must have (lm_head only when untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not arch.tied_embeddings
                                                                   else set())
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"] + [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"] if arch.qkv_bias else []
    per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if arch.qk_norm else []
    return names | {f"model.layers.{i}.{n}" for i in range(arch.num_layers) for n in per_layer}


def local_sharded_tensors(model, *, skip_prefixes: tuple[str, ...] = ()):
    """This rank's ShardedTensors (factories applied, extra-state objects dropped) in a fixed order.

    Their ``data`` alias the live parameters, so copying into them loads weights in place.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor) and "_extra_state" not in t.key]
    return [t for t in tensors if not t.key.startswith(skip_prefixes)]


def _layer_of(sh) -> int | None:
    return sh.global_offset[0] if sh.prepend_axis_num else None


def _local_slices(sh) -> tuple:
    return tuple(sh.global_slice()[sh.prepend_axis_num:])


@torch.no_grad()
def load_weights(model, fetch_full: Callable[[str, int | None], torch.Tensor], *,
                 skip_prefixes: tuple[str, ...] = ()) -> int:
    """Fill ``model``'s parameters from full tensors: ``fetch_full(key, layer)`` -> the unsharded tensor.

    Returns the number of tensors loaded. Shapes are checked with a clear error.
    """
    count = 0
    cache: dict[tuple[str, int | None], torch.Tensor] = {}
    for sh in local_sharded_tensors(model, skip_prefixes=skip_prefixes):
        layer = _layer_of(sh)
        ident = (sh.key, layer)
        if ident not in cache:    # the two SwiGLU halves of fc1 share one full tensor
            cache.clear()
            cache[ident] = fetch_full(sh.key, layer)
        full = cache[ident]
        expected = tuple(sh.global_shape[sh.prepend_axis_num:])
        if tuple(full.shape) != expected:
            raise ValueError(f"weight {sh.key} (layer {layer}) has shape {tuple(full.shape)}, the model expects "
                             f"{expected}: the checkpoint does not match this architecture")
        sh.data.copy_(full[_local_slices(sh)])
        count += 1
    return count


@torch.no_grad()
def gather_weights(model, tp_group, *, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Full Megatron tensors (per-layer keys stacked on a leading layer axis), on every rank of ``tp_group``.

    Each TP-split tensor is all-gathered with its owners' global offsets; replicated tensors are read locally.
    """
    full: dict[str, torch.Tensor] = {}
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    for sh in local_sharded_tensors(model):
        target = full.get(sh.key)
        if target is None:
            target = full[sh.key] = torch.empty(sh.global_shape, dtype=sh.data.dtype,
                                                device="cpu" if to_cpu else sh.data.device)
        local_global = tuple(sh.global_shape[sh.prepend_axis_num:])
        if tuple(sh.local_shape) == local_global or tp == 1:
            target[sh.global_slice()] = sh.data.to(target.device)
            continue
        datas = [torch.empty_like(sh.data) for _ in range(tp)]
        dist.all_gather(datas, sh.data.contiguous(), group=tp_group)
        offset = torch.tensor(sh.global_offset, dtype=torch.int64, device=sh.data.device)
        offsets = [torch.empty_like(offset) for _ in range(tp)]
        dist.all_gather(offsets, offset, group=tp_group)
        for data, off in zip(datas, offsets):
            off = off.tolist()
            index = tuple(off[:sh.prepend_axis_num]) + tuple(
                slice(o, o + n) for o, n in zip(off[sh.prepend_axis_num:], sh.local_shape))
            target[index] = data.to(target.device)
    return full
