"""Build Megatron-core GPT models (student, reference, teacher, critic) from a :class:`ModelArch`.

Layer spec: TransformerEngine's when TE is importable and CUDA is present (packed micro-batches then go
through THD ``PackedSeqParams``), else Megatron's local spec (CPU; packed micro-batches use a block-diagonal
causal mask and per-sequence RoPE positions, see :class:`PackedGPTModel`).
"""
from __future__ import annotations

import torch

from .arch import ModelArch, check_tensor_parallel
from .cpu_compat import cuda_absent

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def te_available() -> bool:
    """True when TransformerEngine can be used: importable and a CUDA device is present."""
    if cuda_absent():
        return False
    from megatron.core.extensions.transformer_engine import HAVE_TE
    return bool(HAVE_TE)


def transformer_config(arch: ModelArch, *, tensor_parallel: int, dtype: str):
    """Megatron TransformerConfig equivalent to the HF model (fp32 softmax, no dropout, no fused CUDA ops on CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    check_tensor_parallel(arch, tensor_parallel)
    on_cpu = cuda_absent()
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        tensor_model_parallel_size=tensor_parallel, normalization="RMSNorm", layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=DTYPES[dtype], bf16=dtype == "bf16", pipeline_dtype=DTYPES[dtype],
        attention_softmax_in_fp32=True, use_cpu_initialization=on_cpu,
        # Fusions that need nothing but torch (jit-scripted SwiGLU / bias-dropout-add) on GPU only; the ones
        # needing Apex or Megatron's compiled softmax extension stay off (TE's attention and norms replace them,
        # and the local-spec fallback on a GPU without TE must not import kernels that are not built).
        bias_activation_fusion=not on_cpu, bias_dropout_fusion=not on_cpu, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        # Our loss is already normalised by the global sample/token count (see trainer.py).
        calculate_per_token_loss=False,
    )


def _layer_spec(arch: ModelArch, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def _packed_gpt_class():
    from megatron.core.models.gpt import GPTModel

    class PackedGPTModel(GPTModel):
        """GPTModel whose RoPE honours ``position_ids`` for packed rows (local spec, no THD).

        Stock GPTModel gives RoPE the positions 0..S-1 of the whole row and ignores ``position_ids``; with
        several sequences packed in one row each must restart at 0. THD ``PackedSeqParams`` (TE) already
        restart per sequence, so this only changes the ``packed_seq_params is None`` case.
        """

        def _preprocess(self, input_ids, position_ids, *args, **kwargs):
            out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
            packed = kwargs.get("packed_seq_params")
            if position_ids is None or packed is not None or out[1] is None:
                return out
            # out[1]: rotary freqs [S, 1, 1, D] for positions 0..S-1; regather them at each token's position.
            table = self.rotary_pos_emb(int(position_ids.max()) + 1)          # [P, 1, 1, D]
            emb = table[position_ids.transpose(0, 1)].squeeze(2)             # [S, B, 1, D]
            return (out[0], emb) + tuple(out[2:])

    return PackedGPTModel


class ValueHead(torch.nn.Module):
    """Scalar value head used as the critic's ``output_layer`` (same call signature as Megatron's).

    Replicated on every TP rank: its input (the final hidden states) is identical across TP ranks, so its
    gradients are too.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        # Zero init: the critic starts by predicting 0 everywhere (named weight/bias so that Megatron's
        # LanguageModule.sharded_state_dict finds ``output_layer.weight`` as it expects).
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def build_gpt(arch: ModelArch, *, tensor_parallel: int, dtype: str = "fp32", value_head: bool = False):
    """A GPTModel (or a critic: GPT trunk + :class:`ValueHead`) on the current device, in train mode."""
    config = transformer_config(arch, tensor_parallel=tensor_parallel, dtype=dtype)
    use_te = te_available()
    model = _packed_gpt_class()(
        config=config, transformer_layer_spec=_layer_spec(arch, use_te), vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings, parallel_output=True,
        share_embeddings_and_output_weights=arch.tied_embeddings and not value_head,
        position_embedding_type="rope", rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_llama3_factor is not None, rope_scaling_factor=arch.rope_llama3_factor or 8.0)
    if value_head:
        model.output_layer = ValueHead(arch.hidden_size, DTYPES[dtype])
    if not cuda_absent():
        model.cuda(torch.cuda.current_device())
    model.use_te = use_te
    return model


def final_hidden_states(hidden_states, **_):
    """GPTModel ``output_processor``: return the decoder's final hidden states [S, B, d] (the final norm is applied
    by the decoder) as [B, S, d] instead of the logits; the trainer applies the output layer fused with the loss
    (``opd_kernels.fused_linear_logprobs``), chunked over tokens."""
    return hidden_states.transpose(0, 1)


def unwrap(model):
    """The GPTModel inside a Megatron DDP wrapper (or the model itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model
