"""Fused on-policy-distillation ops for PyTorch: token log-probs, OPD advantages, exact and top-K reverse KL."""
from ._backend import BACKENDS, use_backend
from .ops.fused_linear import (FusedLinearOutput, FusedOPDAdvantages, LinearTeacher, TopKTeacher,
                               fused_linear_logprobs, fused_linear_opd_advantages)
from .ops.opd_advantages import KL_KINDS, OPDAdvantages, opd_advantages
from .ops.reverse_kl import reverse_kl
from .ops.token_logprobs import token_logprobs
from .ops.topk_kl import topk_kl

__all__ = ["BACKENDS", "FusedLinearOutput", "FusedOPDAdvantages", "KL_KINDS", "LinearTeacher", "TopKTeacher",
           "fused_linear_logprobs", "fused_linear_opd_advantages", "OPDAdvantages", "opd_advantages", "reverse_kl",
           "token_logprobs", "topk_kl", "use_backend"]
