"""pytest-benchmark suite for opd_kernels.token_logprobs against its baselines (options: benchmarks/conftest.py).

    pytest benchmarks/bench_token_logprobs.py [--bench-shapes 4096x151936] [--bench-backends cpp naive]
"""
import pytest

from benchmarks.common import MODES

OP = "token_logprobs"


@pytest.mark.parametrize("mode", MODES[OP])
def test_token_logprobs(run_case, mode, shape, impl):
    run_case(OP, mode, shape, impl)
