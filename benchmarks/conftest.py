"""pytest-benchmark plumbing shared by benchmarks/bench_<op>.py (not collected by the default test run).

    pytest benchmarks/bench_token_logprobs.py                          # CPU, T=1024, V=32000, fp32 + bf16
    pytest benchmarks/bench_*.py -k "cpp or naive" --bench-shapes 4096x32000 4096x151936 --bench-dtypes bf16
    pytest benchmarks/bench_reverse_kl.py --bench-device cuda --bench-shapes 8192x151936 --bench-dtypes bf16

Each case first checks its output against the float64 oracle on a few rows (a wrong kernel fails instead of
posting a fast time), then times with ``benchmark.pedantic``; ``extra_info`` holds the bytes and GB/s.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` importable under plain `pytest`

from benchmarks import common, impls  # noqa: E402

CHECK_ROWS = 32


def pytest_addoption(parser):
    g = parser.getgroup("opd benchmarks")
    g.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"))
    g.addoption("--bench-shapes", nargs="+", default=["1024x32000"], help="TxV, e.g. 4096x151936")
    g.addoption("--bench-dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    g.addoption("--bench-backends", nargs="+", default=None, choices=impls.IMPLS,
                help=f"default per device: {impls.DEFAULT_IMPLS}")
    g.addoption("--bench-rounds", type=int, default=10)


def _shape(text: str) -> tuple[int, int]:
    try:
        T, V = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise pytest.UsageError(f"--bench-shapes: {text!r} is not TxV (e.g. 4096x151936)") from None
    return T, V


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "shape" in metafunc.fixturenames:
        shapes = [_shape(s) + (d,) for s in cfg.getoption("--bench-shapes") for d in cfg.getoption("--bench-dtypes")]
        metafunc.parametrize("shape", shapes, ids=[f"{t}x{v}-{d}" for t, v, d in shapes])
    if "impl" in metafunc.fixturenames:
        device = cfg.getoption("--bench-device")
        metafunc.parametrize("impl", cfg.getoption("--bench-backends") or impls.DEFAULT_IMPLS[device])


class _InputCache:
    """One set of inputs alive at a time (a 4096x151936 fp32 pair is 5 GB)."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.value = device, None, None

    def get(self, T: int, V: int, dtype: str, with_teacher: bool) -> impls.Inputs:
        key = (T, V, dtype)
        if self.key != key or (with_teacher and self.value.teacher is None):
            self.value = None
            self.value = impls.make_inputs(T, V, common.DTYPES[dtype], self.device, with_teacher=with_teacher)
            self.key = key
        return self.value


@pytest.fixture(scope="session")
def _inputs(request):
    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: torch sees no CUDA device here")
    return _InputCache(device)


@pytest.fixture
def run_case(benchmark, _inputs, request):
    """run_case(op, mode, shape, impl): check against the oracle, then time one case."""
    rounds = request.config.getoption("--bench-rounds")

    def run(op: str, mode: str, shape: tuple[int, int, str], impl: str) -> None:
        device = _inputs.device
        if (reason := impls.unavailable_reason(impl, device)) is not None:
            pytest.skip(reason)
        T, V, dtype = shape
        inputs = _inputs.get(T, V, dtype, with_teacher=op == "reverse_kl")
        fn = impls.build(impl, op, mode, inputs)
        try:
            result = fn()  # the first call compiles (torch.compile / Triton): outside the timing
            verdict = impls.check(impl, op, mode, inputs, result, CHECK_ROWS)
            if verdict is not None:
                err, tol = verdict
                assert err <= tol, f"{impl} {op} {mode}: max relative error {err:.3g} vs float64 > {tol:g}"
            del result
            timed = fn if device.type == "cpu" else (lambda: (fn(), torch.cuda.synchronize()))
            benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        finally:
            if impl == "liger":
                inputs.refill()
        nbytes = common.bytes_moved(op, mode, T, V, inputs.student.element_size())
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(op=op, mode=mode, T=T, V=V, dtype=dtype, backend=impl, bytes=nbytes,
                                    gbps=nbytes / median / 1e9)
    return run
