"""The ``backend`` fixture: every test taking it runs once per row-kernel backend and device of this machine.

CPU: torch, cpp, triton (in Triton's interpreter: TRITON_INTERPRET=1 is set before ``opd_kernels.triton`` is
first imported); CUDA (when present): torch, cuda, triton. A backend the machine lacks is skipped with the reason.
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


def _prepare_triton_interpreter(monkeypatch) -> str | None:
    """Turn the interpreter on before the Triton kernels are defined; a reason to skip when that is too late."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import opd_kernels.triton as tk  # noqa: PLC0415  (must follow the environment change)

    if not tk.interpreting():
        return "opd_kernels.triton was imported without TRITON_INTERPRET=1 earlier in this process"
    return None


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for d, b in CASES])
def backend(request, monkeypatch):
    device, name = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if name == "triton" and device == "cpu":
        reason = _prepare_triton_interpreter(monkeypatch)
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
