"""One Megatron model with its weights source, and (when trainable) DDP, optimizer and LR schedule.

The trainer holds up to four engines: actor (trainable), critic (trainable, value head), reference and
teacher (frozen). Everything that touches a single model lives here: building, loading weights from a HF
directory or a torch_dist checkpoint, checkpoint state dicts, HF export tensors, CPU offload.
"""
from __future__ import annotations

import os
import re

import torch

from . import checkpoint as ckpt
from ...hf import read_config
from .arch import ModelArch, arch_from_hf_config
from .config import ModelSource, OptimizerSettings
from .convert import expected_hf_names, gather_weights, hf_tensors_from_mcore, load_weights, mcore_tensor_from_hf
from .dist import ParallelContext
from .hf_io import HFWeights
from .model import DTYPES, build_gpt, final_hidden_states, unwrap

VALUE_HEAD_PREFIX = "output_layer."   # critic: the value head replaces the LM output layer


def arch_of_source(source: ModelSource) -> ModelArch:
    if source.hf_path is not None:
        return arch_from_hf_config(read_config(source.hf_path))
    if source.checkpoint is not None:
        return ckpt.read_arch(source.checkpoint, source.step)
    return arch_from_hf_config(source.hf_config)


def arch_of_dir(directory: str, step: int | None = None) -> tuple[ModelArch, str]:
    """Architecture of a torch_dist checkpoint dir (kind "checkpoint") or a HF dir (kind "hf")."""
    if ckpt.has_checkpoint(directory) or step is not None:
        return ckpt.read_arch(directory, step), "checkpoint"
    if os.path.isfile(os.path.join(directory, "config.json")):
        return arch_from_hf_config(read_config(directory)), "hf"
    raise FileNotFoundError(f"{directory!r} is neither a torch_dist checkpoint (no {ckpt.TRACKER}; iterations: "
                            f"{ckpt.list_iterations(directory) or 'none'}) nor a HF model dir (no config.json)")


def freeze_parameters(module: torch.nn.Module, only_train: tuple[str, ...] | None,
                      freeze: tuple[str, ...]) -> list[str]:
    """slime's rule: with ``only_train`` a parameter trains only if its name matches one of those regexes
    (``re.search``); then one that matches a ``freeze`` regex is frozen. Returns the frozen names (before DDP and
    the optimizer, which then leave them out). A pattern that matches no name is an error, not a silent no-op: a
    typo would otherwise train what the user meant to freeze."""
    names = [n for n, _ in module.named_parameters()]
    for flag, patterns in (("--only-train-params-name-list", only_train or ()), ("--freeze-params-name-list", freeze)):
        for pattern in patterns:
            if not any(re.search(pattern, n) for n in names):
                kinds = sorted({re.sub(r"layers\.\d+\.", "layers.N.", n) for n in names})
                raise ValueError(f"{flag} {pattern!r} matches no parameter of the model; its parameter names: "
                                 f"{', '.join(kinds)}")
    frozen = []
    for n, p in module.named_parameters():
        if (only_train is not None and not any(re.search(q, n) for q in only_train)
                or any(re.search(q, n) for q in freeze)):
            p.requires_grad_(False)
            frozen.append(n)
    if len(frozen) == len(names):
        raise ValueError("--only-train-params-name-list / --freeze-params-name-list freeze every parameter: nothing "
                         "is left to train")
    return frozen


def _ranges(numbers) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, numbers = [], sorted(numbers)
    for i, n in enumerate(numbers):
        if i and n == numbers[i - 1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def describe_parameter_names(chosen: list[str], names: list[str]) -> str:
    """``chosen`` (a subset of ``names``) in a few words for a log line: layers whose every tensor is chosen as
    'decoder.layers.0-13', the other layer tensors as 'decoder.layers.14-26.mlp.linear_fc1.weight', other names as
    they are. A 30-layer model's frozen list is ~200 names; the log needs its shape, not its enumeration."""
    layered = re.compile(r"(.*layers\.)(\d+)\.(.*)")
    per_layer: dict[tuple[str, int], set[str]] = {}
    for n in names:
        if m := layered.fullmatch(n):
            per_layer.setdefault((m[1], int(m[2])), set()).add(m[3])
    whole: dict[str, list[int]] = {}
    parts: dict[tuple[str, str], list[int]] = {}
    chosen_set = set(chosen)
    for (prefix, layer), suffixes in sorted(per_layer.items()):
        picked = {s for s in suffixes if f"{prefix}{layer}.{s}" in chosen_set}
        if picked == suffixes:
            whole.setdefault(prefix, []).append(layer)
        else:
            for s in picked:
                parts.setdefault((prefix, s), []).append(layer)
    plain = [n for n in chosen if not layered.fullmatch(n)]
    return ", ".join(plain + [f"{prefix}{_ranges(layers)}" for prefix, layers in whole.items()]
                     + [f"{prefix}{_ranges(layers)}.{s}" for (prefix, s), layers in sorted(parts.items())])


class ModelEngine:
    """A GPT model on this rank. ``optimizer`` settings make it trainable (Megatron DDP + optimizer)."""

    def __init__(self, arch: ModelArch, ctx: ParallelContext, *, dtype: str = "fp32",
                 optimizer: OptimizerSettings | None = None, value_head: bool = False, name: str = "model"):
        self.arch, self.ctx, self.dtype, self.name, self.value_head = arch, ctx, dtype, name, value_head
        self.tokenizer_src: str | None = None
        self.module = build_gpt(arch, tensor_parallel=ctx.tp_size, dtype=dtype, value_head=value_head)
        self.config = self.module.config
        self.model = self.module
        self.optimizer = self.scheduler = None
        if optimizer is not None:
            self._make_trainable(optimizer)
        else:
            self.module.eval()
            self.module.requires_grad_(False)
        self.offloaded = False

    def _make_trainable(self, settings: OptimizerSettings) -> None:
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=settings.use_distributed_optimizer)
        self.frozen = freeze_parameters(self.module, settings.only_train, settings.freeze)
        if self.frozen:                         # in the trainer's log: what the name lists left out of training
            sizes = {n: p.numel() for n, p in self.module.named_parameters()}
            print(f"[{self.name}] frozen on this rank: {sum(sizes[n] for n in self.frozen) / 1e6:.1f}M of "
                  f"{sum(sizes.values()) / 1e6:.1f}M parameters ({describe_parameter_names(self.frozen, list(sizes))})",
                  flush=True)
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=self.module)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad, bf16=self.dtype == "bf16", params_dtype=DTYPES[self.dtype],
            use_distributed_optimizer=settings.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self._fused_cpu_adam()
        # What Megatron-LM's training loop wires up: DP grad reduction after the last micro-batch, and loss
        # scaling (a no-op factor 1 in fp32/bf16).
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss
        decay_steps = settings.lr_decay_steps or settings.lr_warmup_steps + 1
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if settings.lr_warmup_steps else settings.lr, max_lr=settings.lr,
            min_lr=settings.min_lr, lr_warmup_steps=settings.lr_warmup_steps, lr_decay_steps=decay_steps,
            lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
            wd_incr_steps=decay_steps, wd_incr_style="constant")

    # ---- weights -----------------------------------------------------------------------------------------
    def load_source(self, source: ModelSource) -> None:
        """Initial weights from a model source (random init from ``hf_config`` keeps Megatron's init)."""
        if source.hf_path is not None:
            self.load_hf(source.hf_path)
        elif source.checkpoint is not None:
            self.load_model_checkpoint(source.checkpoint, source.step)

    def _skip(self) -> tuple[str, ...]:
        return (VALUE_HEAD_PREFIX,) if self.value_head else ()

    def load_hf(self, directory: str) -> None:
        weights = HFWeights(directory)
        missing = sorted(expected_hf_names(self.arch) - weights.names())
        if missing:
            raise ValueError(f"HF checkpoint {directory!r} lacks {len(missing)} tensors of a {self.arch.family} "
                             f"model, e.g. {missing[:3]}")
        dtype = DTYPES[self.dtype]
        load_weights(self.module, lambda key, layer: mcore_tensor_from_hf(
            self.arch, key, layer, lambda n: weights.get(n).to(dtype)), skip_prefixes=self._skip())
        self.tokenizer_src = directory
        self.sync_main_params()

    def _model_template(self) -> dict:
        sharded = self.module.sharded_state_dict()
        return {k: v for k, v in sharded.items() if not k.startswith(self._skip())}

    def load_model_checkpoint(self, directory: str, step: int | None = None) -> int:
        """Model weights only (no optimizer) from a torch_dist checkpoint; the architecture must match."""
        step = ckpt.resolve_iteration(directory, step)
        stored = ckpt.read_arch(directory, step)
        if not stored.same_shape_as(self.arch) and not self.value_head:
            raise ValueError(f"checkpoint {ckpt.iteration_dir(directory, step)} holds a different architecture "
                             f"({stored.family}, {stored.num_layers} layers, hidden {stored.hidden_size}) than "
                             f"this {self.name} ({self.arch.family}, {self.arch.num_layers} layers, hidden "
                             f"{self.arch.hidden_size})")
        loaded = ckpt.load(directory, step, {"model": self._model_template()})
        self.module.load_state_dict(loaded["model"], strict=not self.value_head)
        self.tokenizer_src = os.path.join(ckpt.iteration_dir(directory, step), "hf")
        self.sync_main_params()
        return step

    def sync_main_params(self) -> None:
        """After writing model weights directly, refresh the optimizer's fp32 master copies (bf16 training)."""
        if self.optimizer is not None and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Full HF-named tensors of this model (collective over the TP group; CPU tensors)."""
        return hf_tensors_from_mcore(self.arch, gather_weights(self.module, self.ctx.tp_group))

    # ---- checkpoint state ----------------------------------------------------------------------------------
    def _torch_adams(self) -> list:
        """The torch.optim.Adam(W) instances inside Megatron's optimizer (none with TE/Apex FusedAdam)."""
        inners = [c.optimizer for c in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        return [o for o in inners if type(o) in (torch.optim.Adam, torch.optim.AdamW)]

    def _fused_cpu_adam(self) -> None:
        """On CPU torch Adam takes its per-tensor loop (foreach and fused are CUDA defaults): 0.84 s per step for
        SmolLM2's 124M parameters on 2 cores, 0.12 s with the fused CPU kernel (the same update in one pass). Set
        after building the optimizer and again after loading its state (which may bring back saved groups)."""
        for inner in self._torch_adams():
            for group in inner.param_groups:
                if all(p.device.type == "cpu" for p in group["params"]):
                    group["fused"], group["foreach"] = True, False

    def _ensure_optimizer_state(self) -> None:
        """Create torch Adam's per-parameter state (zeros, step 0) where no step has run yet.

        Without Apex/TE, Megatron wraps torch.optim.Adam, which creates its state lazily at the first step;
        Megatron's checkpoint code reads ``state["step"]`` of every parameter, so saving or loading before the
        first step would fail. This is exactly the state the first step would start from.
        """
        for inner in self._torch_adams():
            for group in inner.param_groups:
                for p in group["params"]:
                    if len(inner.state[p]) == 0:
                        inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                              exp_avg_sq=torch.zeros_like(p))

    def _adam_step(self) -> float | None:
        steps = [float(st["step"]) for o in self._torch_adams() for st in o.state.values() if "step" in st]
        return max(steps) if steps else None

    def _restore_adam_step(self, step: float) -> None:
        # Megatron 0.19's dp_reshardable load restores exp_avg/exp_avg_sq of torch Adam but hands back the
        # per-parameter "step" (Adam's bias-correction counter) as the load template's value, 0; a resumed run
        # would then take a different step than an uninterrupted one. We store the counter ourselves.
        for inner in self._torch_adams():
            for st in inner.state.values():
                st["step"] = torch.tensor(float(step))

    def state_dict_for_save(self, with_optimizer: bool, extra: dict) -> dict:
        state = {"model": self.module.sharded_state_dict(), "opd": extra}
        if with_optimizer and self.optimizer is not None:
            self._ensure_optimizer_state()
            state["optimizer"] = self.optimizer.sharded_state_dict(state["model"], metadata=ckpt.OPTIM_METADATA)
            state["opd"] = {**extra, "scheduler": self.scheduler.state_dict(), "adam_step": self._adam_step()}
        return state

    def load_full_checkpoint(self, directory: str, step: int, *, load_optimizer: bool) -> dict:
        """Model (+ optimizer and schedule) from iteration ``step``; returns the stored ``opd`` extras."""
        meta = ckpt.read_meta(directory, step)
        if load_optimizer and not meta.get("has_optimizer"):
            raise ValueError(f"checkpoint {ckpt.iteration_dir(directory, step)} has no optimizer state; resume "
                             "with CheckpointSettings(no_load_optim=True)")
        layout = (meta.get("tensor_parallel"), meta.get("data_parallel"))
        if load_optimizer and layout != (self.ctx.tp_size, self.ctx.dp_size):
            raise ValueError(f"the optimizer state was saved with TP x DP = {layout[0]} x {layout[1]}, this run "
                             f"is {self.ctx.tp_size} x {self.ctx.dp_size}; resume with no_load_optim=True "
                             "(weights reshard freely; the optimizer layout does not)")
        template = {"model": self.module.sharded_state_dict()}
        if load_optimizer:
            self._ensure_optimizer_state()
            template["optimizer"] = self.optimizer.sharded_state_dict(template["model"], is_loading=True,
                                                                      metadata=ckpt.OPTIM_METADATA)
        loaded = ckpt.load(directory, step, template)
        self.module.load_state_dict(loaded["model"])
        if load_optimizer:
            # fp32 + distributed optimizer: the main params are views of the model params (leaf tensors that
            # require grad), so the in-place copy must run without autograd.
            with torch.no_grad():
                self.optimizer.load_state_dict(loaded["optimizer"])
            self._fused_cpu_adam()
            extras = loaded.get("opd", {})
            if extras.get("adam_step") is not None:
                self._restore_adam_step(extras["adam_step"])
            if "scheduler" in extras:
                # Megatron's scheduler ADDS the stored step count to its own (load_state_dict calls
                # step(increment=n)): start from 0 so a second load in the same process lands on n.
                self.scheduler.num_steps = 0
                self.scheduler.load_state_dict(extras["scheduler"])
        else:
            self.sync_main_params()
        return dict(loaded.get("opd", {}))

    # ---- placement ---------------------------------------------------------------------------------------
    def offload(self) -> None:
        """Move a frozen model's weights to CPU (meaningful on GPU; a no-op on CPU)."""
        if self.ctx.device.type == "cuda" and not self.offloaded:
            self.module.to("cpu")
            self.offloaded = True

    def onload(self) -> None:
        if self.offloaded:
            self.module.to(self.ctx.device)
            self.offloaded = False

    def __call__(self, mb):
        """Logits [1, S, V/TP] (critic: values [1, S, 1]) of one packed micro-batch."""
        return self.model(mb.input_ids, mb.position_ids, mb.attention_mask, packed_seq_params=mb.packed_seq_params)

    def hidden(self, mb):
        """The final hidden states [1, S, d] (after the final norm; the output layer is not applied)."""
        return self.model(mb.input_ids, mb.position_ids, mb.attention_mask, packed_seq_params=mb.packed_seq_params,
                          output_processor=final_hidden_states)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head's weight [V / TP, d] (this rank's vocabulary shard): the embedding when tied."""
        module = unwrap(self.model)
        if module.share_embeddings_and_output_weights:
            return module.shared_embedding_or_output_weight()
        return module.output_layer.weight

    @property
    def step_module(self):
        return unwrap(self.model)
