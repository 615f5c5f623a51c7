"""Megatron-core trainer backend (every Megatron import of the project lives in this package).

Runs the same Megatron code path on GPU (nccl, TransformerEngine layer spec, THD packed sequences) and on
CPU (gloo, Megatron's local layer spec, block-diagonal masks; :mod:`.cpu_compat` redirects Megatron's
hard-coded CUDA calls only while our methods run, and only when CUDA is absent).

Usage, on every rank (a Ray actor or a torch.multiprocessing worker; entry points need a ``__main__`` guard
because Megatron's checkpoint writer spawns a helper process)::

    from opd_train.backends.megatron import (MegatronTrainer, TrainerSettings, ModelSource, ParallelSettings,
                                             OptimizerSettings, CheckpointSettings, TeacherSettings,
                                             LossSettings, TrainBatch, init_distributed)
    ctx = init_distributed(rank=r, world_size=w, master_addr="127.0.0.1", master_port=29500,
                           tensor_parallel=2, seed=1234)
    trainer = MegatronTrainer(TrainerSettings(
        model=ModelSource(hf_path="/models/Qwen3-8B"), parallel=ParallelSettings(tensor_parallel=2),
        optimizer=OptimizerSettings(lr=1e-6, clip_grad=1.0),
        checkpoint=CheckpointSettings(load="ckpt/", save="ckpt/", save_interval=20),
        teacher=TeacherSettings(load="/ckpt/Qwen3-32B_torch_dist", step=None, offload=True),
        temperature=1.0), ctx)

    batch = TrainBatch(tokens=[prompt + response, ...], response_lengths=[...], loss_masks=[...])
    # with TrainerSettings(..., opd=OPDSettings(estimator="k1", advantage_coef=1.0)): the OPD forward, one fused
    # opd_kernels.opd_advantages call per micro-batch (per chunk of its token rows: the output layer is fused
    # with the loss, BatchingSettings.fused_output_layer) -> old log-probs, KL term, A' = A - coef * KL_t
    scored = trainer.forward(batch, advantages=base_advantages)   # Megatron teacher; or teacher=TeacherRows(...)
    #   scored.logprobs / .advantages / .opd_kl / .teacher_logprobs / .ref_logprobs / .values: list of [R_i]
    metrics = trainer.train_step(batch, scored.advantages, scored.logprobs, loss=LossSettings(eps_clip=0.2),
                                 num_samples=global_batch_size)                  # dict of floats
    # OPDSettings(estimator=None, advantage_coef=0, loss_coef=1.0): the exact (Megatron teacher) or top-K
    # (TeacherRows(topk_ids=..., topk_logprobs=...)) reverse KL is added to the loss instead
    trainer.train_critic_step(batch, returns, old_values)                     # PPO with a critic
    trainer.maybe_save()                                                      # --save-interval
    trainer.save_checkpoint("ckpt/", step)       # DIR/iter_0000010 + latest_checkpointed_iteration.txt
    trainer.load_checkpoint("ckpt/")             # -> step (model + optimizer + LR schedule)
    trainer.export_hf("weights/v10")             # rank 0: safetensors + config.json + tokenizer files
    trainer.load_teacher("/ckpt/teacher", step=5)

Rules the caller must follow: all TP ranks of a data-parallel group pass the same ``TrainBatch`` (checked);
DP ranks pass disjoint shares; ``num_samples`` / ``num_tokens`` are GLOBAL counts (default: summed over DP).
Per-sample inputs (advantages, old log-probs, returns...) are lists of [R_i] tensors or padded [B, R_max].
On a shared CPU, give each rank few torch threads (``torch.set_num_threads``): oversubscribed OpenMP threads
made a forward 5x slower on this team's 2-core machine.

Conversion (``tools/convert_hf_to_torch_dist.py``): :func:`convert_hf_to_torch_dist` and
:func:`convert_torch_dist_to_hf`, Qwen3 / Qwen2 / Llama, both directions.
"""
from .arch import FAMILIES, ModelArch, arch_from_hf_config
from .config import (BatchingSettings, CheckpointSettings, CriticSettings, LossSettings, ModelSource, OPDSettings,
                     OptimizerSettings, ParallelSettings, PrecisionSettings, TeacherSettings, TrainerSettings)
from .cpu_compat import cpu_compat
from .dist import ParallelContext, destroy_distributed, init_distributed
from .packing import TrainBatch
from .tools import convert_hf_to_torch_dist, convert_torch_dist_to_hf
from .trainer import ForwardResult, MegatronTrainer, TeacherRows

__all__ = [
    "FAMILIES", "BatchingSettings", "CheckpointSettings", "CriticSettings", "ForwardResult", "LossSettings",
    "MegatronTrainer", "ModelArch", "ModelSource", "OPDSettings", "OptimizerSettings", "ParallelContext",
    "ParallelSettings", "PrecisionSettings", "TeacherRows", "TeacherSettings", "TrainBatch", "TrainerSettings",
    "arch_from_hf_config",
    "convert_hf_to_torch_dist", "convert_torch_dist_to_hf", "cpu_compat", "destroy_distributed",
    "init_distributed",
]
