"""The model architecture, read from a HuggingFace config dict (Qwen3, Qwen2, Llama families).

:class:`ModelArch` is the single description every other module uses: the Megatron model is built from it,
checkpoints store the HF config it came from (so a teacher of another size rebuilds itself), and the HF <->
Megatron weight mapping reads its head counts. Unsupported features are refused here with a clear message
instead of being silently mis-converted.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("qwen3", "qwen2", "llama")


@dataclass(frozen=True)
class ModelArch:
    family: str                 # qwen3 | qwen2 | llama
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_llama3_factor: float | None   # Llama-3.1 RoPE scaling factor, None = no scaling
    qkv_bias: bool              # Qwen2: bias on q/k/v projections
    qk_norm: bool               # Qwen3: RMSNorm on per-head q and k
    tied_embeddings: bool
    max_position_embeddings: int
    hf_config: dict             # the original HF config (written next to checkpoints and exports)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def same_shape_as(self, other: "ModelArch") -> bool:
        """True when the two architectures have identical parameter shapes and semantics."""
        mine = {k: v for k, v in self.__dict__.items() if k != "hf_config"}
        theirs = {k: v for k, v in other.__dict__.items() if k != "hf_config"}
        return mine == theirs


def _rope_parameters(cfg: dict) -> dict:
    # transformers >= 5 nests RoPE settings under rope_parameters; 4.x config.json files keep rope_theta and
    # rope_scaling at top level. Accept both.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_theta" not in params and "rope_theta" in cfg:
        params["rope_theta"] = cfg["rope_theta"]
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _llama3_factor(rope: dict) -> float | None:
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported by the Megatron backend (supported: none, "
                         "llama3); convert a model without it or extend arch.py")
    # Megatron-core's RotaryEmbedding hard-codes the Llama-3.1 constants below; any other value would be
    # silently ignored, so refuse it.
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key, value in expected.items():
        if float(rope.get(key, value)) != float(value):
            raise ValueError(f"llama3 RoPE scaling with {key}={rope.get(key)} is not supported (Megatron-core "
                             f"fixes it to {value})")
    return float(rope["factor"])


def arch_from_hf_config(cfg: dict) -> ModelArch:
    """Validate a HF config dict and turn it into a :class:`ModelArch` (clear ValueError otherwise)."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not supported by the Megatron backend; supported: {FAMILIES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg.get('hidden_act')!r}: only SwiGLU (silu) MLPs are supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported by the Megatron backend")
    if family == "llama" and cfg.get("mlp_bias"):
        raise ValueError("llama with mlp_bias=True is not supported")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = _rope_parameters(cfg)
    qkv_bias = True if family == "qwen2" else bool(cfg.get("attention_bias", False))
    return ModelArch(
        family=family, num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=int(head_dim), ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]), rope_llama3_factor=_llama3_factor(rope), qkv_bias=qkv_bias,
        qk_norm=family == "qwen3", tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), hf_config=dict(cfg))


def check_tensor_parallel(arch: ModelArch, tp: int) -> None:
    """Megatron splits heads, KV groups, the FFN and the vocabulary evenly over TP ranks."""
    for name, value in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                        ("intermediate_size", arch.ffn_hidden_size), ("vocab_size", arch.vocab_size)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tensor_parallel={tp}; pick a tensor-parallel "
                             f"size that divides it")
