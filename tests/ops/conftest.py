"""The ``backend`` fixture: every test taking it runs once per row-kernel backend and device of this machine.

CPU: torch, cpp, triton (in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); CUDA (when present): torch, cuda, triton. A backend the machine lacks is skipped with the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from opd_kernels import _backend, use_backend

CASES = [("cpu", "torch"), ("cpu", "cpp"), ("cpu", "triton"),
         ("cuda", "torch"), ("cuda", "cuda"), ("cuda", "triton")]


@dataclass(frozen=True)
class Backend:
    name: str
    device: str

    @property
    def slow(self) -> bool:
        """Triton's interpreter: keep shapes small."""
        return self.name == "triton" and self.device == "cpu"

    @property
    def truncates_bf16(self) -> bool:
        """Triton's interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest even): its bf16
        outputs may be one bf16 ulp off instead of half an ulp."""
        return self.slow

    def require_float64_lse(self) -> None:
        """xfail (visibly) when this backend's forward still returns an fp32 lse: its backward then carries an
        error of eps * |lse| into 1 - p (opd_kernels/ops/README.md), which the tolerance rule rejects."""
        kern = _backend.kernels(self.device)
        x = torch.zeros(1, 3, device=self.device)
        lse = kern.logprob_fwd(x, torch.zeros(1, dtype=torch.long, device=self.device), 1.0, 0, -100, False)[2]
        if lse.dtype != torch.float64:
            pytest.xfail(f"the {self.name} backend returns an fp32 lse; the contract asks for float64 "
                         "(opd_kernels/ops/README.md), so its gradients lose accuracy on large-|lse| rows")


def _triton_interpreter_problem() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors in this process, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (tests/conftest.py sets it before triton is imported)"
    pytest.importorskip("triton")
    import opd_kernels.triton as tk  # noqa: PLC0415

    if not tk.interpreting():
        return "opd_kernels.triton was imported before TRITON_INTERPRET=1 was set"
    return None


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for d, b in CASES])
def backend(request, monkeypatch):
    device, name = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if name == "triton" and device == "cpu":
        reason = _triton_interpreter_problem()
        if reason:
            pytest.skip(reason)
    if not _backend.available(name, device):
        pytest.skip(f"backend {name!r} unavailable for {device} tensors: {_backend.why_unavailable(name, device)}")
    monkeypatch.delenv("OPD_KERNELS_BACKEND", raising=False)
    with use_backend(name):
        yield Backend(name, device)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(os.environ.get("OPD_TEST_SEED", "1234")))
