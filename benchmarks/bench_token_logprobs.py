"""pytest-benchmark suite for opd_kernels.token_logprobs against its baselines (options: benchmarks/conftest.py).

    pytest benchmarks/bench_token_logprobs.py [--bench-shapes 4096x151936] [--bench-backends cpp naive]

test_token_logprobs_inplace: fwd+bwd with inplace_backward=True (the logits buffer is refilled before every round, outside
the timing; benchmarks/bench_inplace.py compares it with the other paths, interleaved with other allocations).
"""
import pytest
import torch

from benchmarks import bench_inplace, impls
from benchmarks.common import MODES

OP = "token_logprobs"


@pytest.mark.parametrize("mode", MODES[OP])
def test_token_logprobs(run_case, mode, shape, impl):
    run_case(OP, mode, shape, impl)


def test_token_logprobs_inplace(benchmark, _inputs, shape, request):
    backend = "cpp" if _inputs.device.type == "cpu" else "cuda"
    if (reason := impls.unavailable_reason(backend, _inputs.device)) is not None:
        pytest.skip(reason)
    inputs = _inputs.get(*shape, with_teacher=True)
    original = inputs.student.clone()
    fn = bench_inplace.inplace_fn(backend, OP, inputs)
    try:
        def refill():  # returns None: pedantic's setup may not pass arguments to fn
            inputs.student.copy_(original)
            if original.is_cuda:
                torch.cuda.synchronize()
        benchmark.pedantic(fn, setup=refill, rounds=request.config.getoption("--bench-rounds"), warmup_rounds=1)
    finally:
        inputs.student.copy_(original)
    benchmark.extra_info.update(op=OP, mode="fwd+bwd", T=shape[0], V=shape[1], dtype=shape[2],
                                backend=f"{backend}-inplace")
