"""Triton implementations of the opd row kernels (the contract of ``torch.ops.opd_C.*`` in csrc/registration.cpp).

``from opd_kernels import triton as tk; tk.logprob_fwd(...)``: same names, argument order and semantics as the
C++/CUDA schemas, on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 was set before this package was
imported: Triton decides at kernel-definition time). Also the optional fused OPD epilogues ``opd_sampled_fwd`` and
``opd_full_fwd`` (one launch for ``opd_advantages``), and the in-place forms ``*_fwd_inplace`` / ``*_bwd_inplace``
(the gradient written into the logits buffer).
"""
from ._common import interpreting
from .kl import kl_bwd, kl_bwd_inplace, kl_fwd, kl_fwd_inplace
from .logprob import logprob_bwd, logprob_bwd_inplace, logprob_fwd, logprob_fwd_inplace
from .opd import opd_full_fwd, opd_sampled_fwd

__all__ = ["interpreting", "kl_bwd", "kl_bwd_inplace", "kl_fwd", "kl_fwd_inplace", "logprob_bwd", "logprob_bwd_inplace",
           "logprob_fwd", "logprob_fwd_inplace", "opd_full_fwd", "opd_sampled_fwd"]
