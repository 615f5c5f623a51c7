"""Backend selection, input validation (before any kernel runs), and the row layouts read without a copy."""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _backend, _epilogue, use_backend
from opd_kernels.ops import _rows


# ---------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------
def test_auto_picks_cpp_for_cpu_only_when_its_kernels_are_registered(monkeypatch):
    monkeypatch.delenv("OPD_KERNELS_BACKEND", raising=False)
    registered = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"opd_C::{op}", "CPU")
                     for op in _backend.CORE_KERNELS) if _backend._HAVE_LIB else False
    assert _backend.resolve("cpu") == ("cpp" if registered else "torch")
    monkeypatch.setattr(_backend, "available", lambda name, device: name == "torch")
    assert _backend.resolve("cpu") == "torch"
    assert _backend.resolve("cuda") == "torch"


def test_environment_variable_and_context_manager(monkeypatch):
    monkeypatch.setenv("OPD_KERNELS_BACKEND", "torch")
    assert _backend.resolve("cpu") == "torch"
    with use_backend("auto"):
        assert _backend.resolve("cpu") in ("cpp", "torch")  # the context manager wins over the variable
    assert _backend.kernels("cpu").name == "torch"
    monkeypatch.setenv("OPD_KERNELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="OPD_KERNELS_BACKEND='tpu'"):
        _backend.resolve("cpu")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with use_backend("fast"):
            pass


def test_unavailable_backend_says_why():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        _backend.resolve("cpu")
    if not _backend.available("cpp", "cpu"):
        pytest.skip(f"cpp unavailable here: {_backend.why_unavailable('cpp', 'cpu')}")
    with use_backend("cpp"), pytest.raises(RuntimeError, match="CPU tensors only"):
        _backend.resolve("cuda")


def test_every_backend_table_is_complete():
    for name in ("torch", "cpp"):
        if _backend.available(name, "cpu"):
            with use_backend(name):
                table = _backend.kernels("cpu")
            assert all(callable(getattr(table, k)) for k in _backend.CORE_KERNELS + _backend.EPILOGUE_KERNELS)


def test_fused_epilogue_equals_the_composed_one():
    if not _backend.available("cpp", "cpu"):
        pytest.skip(f"cpp unavailable here: {_backend.why_unavailable('cpp', 'cpu')}")
    gen = torch.Generator().manual_seed(0)
    x, xt = torch.randn(9, 301, generator=gen), torch.randn(9, 301, generator=gen)
    tokens = torch.randint(0, 301, (9,), generator=gen)
    adv, tlp = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    mask = torch.rand(9, generator=gen) > 0.3
    with use_backend("cpp"):
        fused = _backend.kernels("cpu")
    composed = _epilogue.compose_missing({k: getattr(fused, k) for k in _backend.CORE_KERNELS})
    for kind in (1, 2, 3):
        for a, b in zip(fused.opd_sampled_fwd(x, tokens, adv, tlp, mask, 0.4, 1.1, kind),
                        composed["opd_sampled_fwd"](x, tokens, adv, tlp, mask, 0.4, 1.1, kind)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused.opd_full_fwd(x, xt, tokens, adv, mask, 0.4, 1.1),
                    composed["opd_full_fwd"](x, xt, tokens, adv, mask, 0.4, 1.1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# validation: every bad input fails with a clear message before a kernel runs
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_kernels(monkeypatch):
    def boom(device_type):
        raise AssertionError("a kernel was about to run on invalid input")
    monkeypatch.setattr(_backend, "kernels", boom)


X = torch.zeros(2, 3, 10)
T = torch.zeros(2, 3, dtype=torch.long)
BAD_CALLS = {
    "integer logits": (TypeError, "float32, bfloat16 or float16",
                       lambda: ok.token_logprobs(X.long(), T)),
    "float tokens": (TypeError, "int64", lambda: ok.token_logprobs(X, T.float())),
    "int32 tokens": (TypeError, r"tokens.long\(\)", lambda: ok.token_logprobs(X, T.int())),
    "shape mismatch": (ValueError, r"shape logits.shape\[:-1\] = \(2, 3\)", lambda: ok.token_logprobs(X, T[:, :2])),
    "empty vocabulary": (ValueError, "non-empty last", lambda: ok.token_logprobs(X[..., :0], T)),
    "token too large": (ValueError, r"token id 10 at position \(1, 2\) is outside the vocabulary \[0, 10\)",
                        lambda: ok.token_logprobs(X, T.index_put((torch.tensor(1), torch.tensor(2)),
                                                                 torch.tensor(10)))),
    "negative token": (ValueError, "token id -1", lambda: ok.token_logprobs(X, T - 1)),
    "zero temperature": (ValueError, "temperature must be finite and > 0", lambda: ok.token_logprobs(X, T, temperature=0)),
    "nan temperature": (ValueError, "temperature", lambda: ok.token_logprobs(X, T, temperature=float("nan"))),
    "tensor temperature": (TypeError, "temperature must be a Python number",
                           lambda: ok.token_logprobs(X, T, temperature=torch.tensor(1.0))),
    "teacher vocabulary": (ValueError, "vocabulary size 9 but student_logits has 10",
                           lambda: ok.reverse_kl(X, torch.zeros(2, 3, 9))),
    "teacher dtype": (TypeError, "teacher_logits must be float32, bfloat16 or float16, got torch.float64",
                      lambda: ok.reverse_kl(X, X.double())),
    "teacher rows": (ValueError, "teacher_logits shape", lambda: ok.reverse_kl(X, X[:1])),
    "teacher needs grad": (ValueError, "detach", lambda: ok.reverse_kl(X, X.clone().requires_grad_())),
    "mask shape": (ValueError, "mask must have shape", lambda: ok.reverse_kl(X, X, mask=torch.ones(3))),
    "unknown kl": (ValueError, "unknown kl 'k4'",
                   lambda: ok.opd_advantages(X, T, T.float(), teacher_logprobs=T.float(), kl="k4")),
    "missing teacher": (ValueError, "kl='k1' takes teacher_logprobs \\(got none\\)",
                        lambda: ok.opd_advantages(X, T, T.float())),
    "topk without the top-k": (ValueError, "kl='topk' takes teacher_topk_ids and teacher_topk_logprobs",
                               lambda: ok.opd_advantages(X, T, T.float(), teacher_logprobs=T.float(), kl="topk")),
    "topk ids of another shape": (ValueError, "topk_ids must have shape logits.shape",
                                  lambda: ok.topk_kl(X, T[:1, :, None].expand(1, 3, 4), T[:1, :, None].float())),
    "full without logits": (ValueError, "kl='full' takes teacher_logits",
                            lambda: ok.opd_advantages(X, T, T.float(), teacher_logprobs=T.float(), kl="full")),
    "advantages shape": (ValueError, "advantages must have shape",
                         lambda: ok.opd_advantages(X, T, T[0].float(), teacher_logprobs=T.float())),
    "integer advantages": (TypeError, "advantages must be a floating-point tensor",
                           lambda: ok.opd_advantages(X, T, T, teacher_logprobs=T.float())),
    "nan coef": (ValueError, "coef must be finite",
                 lambda: ok.opd_advantages(X, T, T.float(), teacher_logprobs=T.float(), coef=float("inf"))),
    "bad token unmasked": (ValueError, "token id 99",
                           lambda: ok.opd_advantages(X, T + 99, T.float(), teacher_logprobs=T.float(),
                                                     mask=torch.ones(2, 3))),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_before_any_kernel(case, no_kernels):
    error, message, call = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()


def test_token_check_switch(monkeypatch):
    bad = T.clone()
    bad[0, 0] = 10
    monkeypatch.setenv("OPD_KERNELS_CHECK_TOKENS", "0")  # unchecked: the out-of-range row reads nothing, gives 0
    assert ok.token_logprobs(X, bad)[0, 0] == 0
    monkeypatch.setenv("OPD_KERNELS_CHECK_TOKENS", "1")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ok.token_logprobs(X, bad)
    monkeypatch.setenv("OPD_KERNELS_CHECK_TOKENS", "yes")
    with pytest.raises(ValueError, match="use auto, 0 or 1"):
        ok.token_logprobs(X, bad)


def test_masked_positions_may_hold_any_token():
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 1] = False
    tokens = T.clone()
    tokens[1, 1] = 10**9
    out = ok.opd_advantages(X, tokens, torch.ones(2, 3), teacher_logprobs=torch.zeros(2, 3), mask=mask)
    assert out.kl[1, 1] == 0 and out.advantages[1, 1] == 1


# ---------------------------------------------------------------------------------------------------------------
# row layouts
# ---------------------------------------------------------------------------------------------------------------
LAYOUTS = {  # name: (view of a [4, 9, 32] base, rows the kernels see, copied?)
    "contiguous": (lambda b: b, 36, False),
    "lm shift [:, :-1]": (lambda b: b[:, :-1], 35, False),
    "seq-first transpose": (lambda b: b.transpose(0, 1), 36, False),
    "broadcast row": (lambda b: b[0, :1].expand(5, 7, 32), 35, False),
    "one row": (lambda b: b[1, 2], 1, False),
    "superset [:, :-3]": (lambda b: b[:, :-3], 33, False),
    "too sparse [:, :2]": (lambda b: b[:, :2], 8, True),
    "vocabulary stride": (lambda b: b[..., ::2], 36, True),
    "overlapping rows": (lambda b: b.view(-1).as_strided((3, 4, 32), (32, 32, 1)), 12, True),
    "mixed broadcast": (lambda b: b[:, :1].expand(4, 3, 32), 12, True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_plans(layout):
    make, rows, copied = LAYOUTS[layout]
    x = make(torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(5)))
    plan = _rows.plan_rows(x)
    assert (plan.rows, plan.copy) == (rows, copied)
    tokens = torch.randint(0, x.shape[-1], x.shape[:-1])
    leaf = x.detach().clone().requires_grad_() if copied else None
    reference = torch.log_softmax(x.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(ok.token_logprobs(x, tokens).double(), reference, rtol=1e-5, atol=1e-6)
    if leaf is None:  # the gradient comes back in the input's own strides (a view of the kernels' [R, V] output)
        grad = _rows.grad_from_rows(torch.zeros(plan.rows, plan.vocab), plan)
        assert grad.shape == x.shape and (plan.index_strides is None or grad.stride() == _rows.grad_strides(plan))
