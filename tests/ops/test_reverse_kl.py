"""reverse_kl (+ gradient) against the float64 oracle, on every backend of this machine."""
from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels.ops.reverse_kl import reverse_kl_reference as reference
from ops_util import (DTYPES, VOCABS, assert_within_rule, grad_of, identity, logits, max_err, near_teacher,
                      rows_for)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings in Triton's interpreter


def _forward_vs_oracle(backend, student, teacher, temperature, what, view=identity):
    kl = ok.reverse_kl(view(student), view(teacher), temperature=temperature)
    assert kl.dtype == torch.float32 and kl.shape == view(student).shape[:-1]
    oracle = reference(view(student.double()), view(teacher.double()), temperature=temperature)
    torch32 = reference(view(student.float()), view(teacher.float()), temperature=temperature)
    assert_within_rule(kl, oracle, torch32, f"{what} kl", backend)


def _gradient_vs_oracle(backend, student, teacher, temperature, gen, what, view=identity):
    shape = view(student).shape[:-1]
    ups = (torch.randn(shape, generator=gen).to(student.device),)

    def run(fn, t):
        return lambda s: fn(s, view(t), temperature=temperature)

    grad = grad_of(run(ok.reverse_kl, teacher), student, ups, view=view)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    oracle = grad_of(run(reference, teacher.double()), student.double(), ups, view=view)
    torch32 = grad_of(run(reference, teacher.float()), student, ups, torch.float32, view=view)
    assert_within_rule(grad, oracle, torch32, f"{what} grad", backend)


def _pairs(shape, dtype, gen, device):
    """(student, teacher, temperature, name): unrelated rows, confident rows, near-identical rows (KL ~ 1e-6)."""
    s = logits(shape, dtype, gen, "random", device)
    yield s, logits(shape, dtype, gen, "random", device), 1.0, "random"
    p = logits(shape, dtype, gen, "peaked", device)
    yield p, logits(shape, dtype, gen, "peaked", device), 0.7, "peaked"
    yield s, near_teacher(s, gen, 1e-3 if dtype == torch.float32 else 3e-2), 1.3, "near-identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
def test_matches_float64_oracle(backend, vocab, dtype, gen):
    if backend.slow and vocab in (128256, 50257) and dtype != torch.float32:
        pytest.skip("Triton interpreter: 151936 and 32000 cover large vocabularies in every dtype")
    cases = list(_pairs((rows_for(vocab, backend.slow), vocab), dtype, gen, backend.device))
    for student, teacher, temperature, what in cases:
        _forward_vs_oracle(backend, student, teacher, temperature, what)
    backend.require_float64_lse()
    for student, teacher, temperature, what in cases:
        _gradient_vs_oracle(backend, student, teacher, temperature, gen, what)


VIEWS = {
    "lm-shift logits[:, :-1]": lambda t: t[:, :-1],
    "seq-first transpose": lambda t: t.transpose(0, 1),
    "vocabulary stride 2": lambda t: t[..., ::2],
}


@pytest.mark.parametrize("layout", VIEWS)
def test_non_contiguous_inputs(backend, layout, gen):
    student = logits((3, 6, 515), torch.bfloat16, gen, "random", backend.device)
    teacher = logits((3, 6, 515), torch.bfloat16, gen, "random", backend.device)
    _forward_vs_oracle(backend, student, teacher, 1.0, layout, VIEWS[layout])
    backend.require_float64_lse()
    _gradient_vs_oracle(backend, student, teacher, 1.0, gen, layout, VIEWS[layout])


def test_student_and_teacher_in_different_layouts(backend, gen):
    """A shifted student view with a contiguous teacher: the op copies to a shared row space, results exact."""
    student = logits((2, 5, 300), torch.float32, gen, "random", backend.device)
    teacher = logits((2, 4, 300), torch.float32, gen, "random", backend.device)
    kl = ok.reverse_kl(student[:, :-1], teacher)
    assert max_err(kl, reference(student[:, :-1].double(), teacher.double())) < 1e-5


def test_identical_rows_give_zero_kl_and_zero_gradient(backend, gen):
    x = logits((4, 1031), torch.bfloat16, gen, "peaked", backend.device).requires_grad_()
    kl = ok.reverse_kl(x, x.detach(), temperature=0.8)
    assert torch.all(kl.abs() <= 1e-6), kl
    kl.sum().backward()
    assert x.grad.abs().max() <= 1e-6


def test_mask_gives_zero_and_zero_gradient_even_for_nan_rows(backend, gen):
    x = logits((5, 300), torch.float32, gen, "random", backend.device)
    teacher = logits((5, 300), torch.float32, gen, "random", backend.device)
    x[1] = float("nan")
    mask = torch.tensor([1, 0, 1, 0, 1], device=x.device)
    grad = grad_of(lambda s: ok.reverse_kl(s, teacher, mask=mask), x, (torch.ones(5, device=x.device),))
    kl = ok.reverse_kl(x, teacher, mask=mask.bool())
    assert torch.all(kl[[1, 3]] == 0) and torch.all(grad[[1, 3]] == 0)
    assert torch.isfinite(grad).all() and torch.all(kl[[0, 2, 4]] > 0)


def test_nan_inf_and_impossible_tokens(backend, gen):
    x = logits((4, 200), torch.float32, gen, "random", backend.device)
    teacher = logits((4, 200), torch.float32, gen, "random", backend.device)
    x[0, 3], teacher[1, 9] = float("nan"), float("inf")
    teacher[2, :50] = float("-inf")  # the teacher rules out tokens the student may pick: KL = inf
    x[3, :50] = teacher[3, :50] = float("-inf")  # both rule them out: finite
    kl = ok.reverse_kl(x, teacher)
    assert torch.isnan(kl[:2]).all() and kl[2] == float("inf")
    assert max_err(kl[3:], reference(x[3:].double(), teacher[3:].double())) < 1e-5


def test_empty_inputs(backend):
    x = torch.zeros(0, 7, 40, device=backend.device, requires_grad=True)
    kl = ok.reverse_kl(x, torch.zeros(0, 7, 40, device=backend.device))
    assert kl.shape == (0, 7)
    kl.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("student_dtype, teacher_dtype", [(torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32),
                                                          (torch.float16, torch.bfloat16)], ids=str)
def test_teacher_in_another_dtype(backend, student_dtype, teacher_dtype, gen):
    """A bf16 teacher for an fp32 student (and the reverse): each input read in its own dtype, results within the
    rule against the float64 oracle of the same values; the gradient has the student's dtype."""
    student = logits((rows_for(32000, backend.slow), 32000), student_dtype, gen, "random", backend.device)
    teacher = logits(student.shape, teacher_dtype, gen, "peaked", backend.device)
    _forward_vs_oracle(backend, student, teacher, 0.8, "mixed dtypes")
    backend.require_float64_lse()
    _gradient_vs_oracle(backend, student, teacher, 0.8, gen, "mixed dtypes")


def test_padded_teacher_vocabulary_is_read_over_the_students_columns(backend, gen):
    """A teacher with a padded embedding (same tokenizer, more rows: Qwen's 151936 / 152064) equals the teacher cut
    to the student's vocabulary, whatever its padding columns hold; no gradient or value comes from them."""
    student = logits((3, 4, 1000), torch.float32, gen, "random", backend.device)
    teacher = torch.cat([logits((3, 4, 1000), torch.bfloat16, gen, "random", backend.device),
                         torch.full((3, 4, 24), 30.0, dtype=torch.bfloat16, device=backend.device)], -1)
    kl = ok.reverse_kl(student, teacher)
    assert torch.equal(kl, ok.reverse_kl(student, teacher[..., :1000].contiguous()))
    backend.require_float64_lse()
    _gradient_vs_oracle(backend, student, teacher[..., :1000], 1.0, gen, "padded teacher")
    with pytest.raises(ValueError, match="has vocabulary size 1000 but student_logits has 1024"):
        ok.reverse_kl(teacher.float(), student)                          # a NARROWER teacher is a different model


def test_padded_teacher_is_refused_under_a_sharded_vocabulary():
    from opd_kernels.ops import _checks
    with pytest.raises(ValueError, match="padded teacher vocabulary is supported unsharded only"):
        _checks.pair(torch.zeros(2, 8), torch.zeros(2, 10), "student_logits", "teacher_logits", sharded=True)
