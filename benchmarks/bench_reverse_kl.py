"""pytest-benchmark suite for opd_kernels.reverse_kl against its baselines (options: benchmarks/conftest.py).

    pytest benchmarks/bench_reverse_kl.py [--bench-shapes 4096x151936] [--bench-backends cpp naive]
"""
import pytest

from benchmarks.common import MODES

OP = "reverse_kl"


@pytest.mark.parametrize("mode", MODES[OP])
def test_reverse_kl(run_case, mode, shape, impl):
    run_case(OP, mode, shape, impl)
