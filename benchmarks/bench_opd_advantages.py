"""pytest-benchmark suite for opd_kernels.opd_advantages against its baselines (options: benchmarks/conftest.py).

    pytest benchmarks/bench_opd_advantages.py [--bench-shapes 4096x151936] [--bench-backends cpp naive]
"""
import pytest

from benchmarks.common import MODES

OP = "opd_advantages"


@pytest.mark.parametrize("mode", MODES[OP])
def test_opd_advantages(run_case, mode, shape, impl):
    run_case(OP, mode, shape, impl)
