"""pytest-benchmark suite for opd_kernels.reverse_kl against its baselines (options: benchmarks/conftest.py).

    pytest benchmarks/bench_reverse_kl.py [--bench-shapes 4096x151936] [--bench-backends cpp naive]

test_reverse_kl_inplace: fwd+bwd with inplace_backward=True (the logits buffer is refilled before every round, outside
the timing; benchmarks/bench_inplace.py compares it with the other paths, interleaved with other allocations).
"""
import pytest

from benchmarks import bench_inplace
from benchmarks.common import MODES

OP = "reverse_kl"


@pytest.mark.parametrize("mode", MODES[OP])
def test_reverse_kl(run_case, mode, shape, impl):
    run_case(OP, mode, shape, impl)


def test_reverse_kl_inplace(benchmark, _inputs, shape, request):
    bench_inplace.pytest_case(benchmark, _inputs, shape, OP, request.config.getoption("--bench-rounds"))
