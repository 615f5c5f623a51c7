"""Teacher top-k -> dense teacher rows and the exact KL against them (OPD full mode from an SGLang top-k)."""
import math

import pytest
import torch

import opd_kernels
from opd_train.algo import topk_reverse_kl, topk_to_dense_logprobs

F64 = torch.float64


def _teacher_topk(rows=5, V=50, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(rows, V, generator=g) * 2
    lq = torch.log_softmax(teacher_logits, -1)
    vals, ids = lq.topk(K, -1)
    student = teacher_logits + torch.randn(rows, V, generator=g)
    return student, ids, vals, lq


def test_dense_rows_normalise_and_keep_the_topk():
    _, ids, vals, _ = _teacher_topk()
    dense = topk_to_dense_logprobs(ids, vals, 50)                                        # [rows, V]
    assert dense.shape == (5, 50) and dense.dtype == torch.float32
    torch.testing.assert_close(torch.logsumexp(dense.double(), -1), torch.zeros(5, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.gather(-1, ids), vals)
    tail = 1 - vals.double().exp().sum(-1)                                               # leftover mass, uniform
    others = torch.ones(5, 50, dtype=torch.bool).scatter_(-1, ids, False)
    expected_tail = (tail / 44).log().float()[:, None].expand(5, 50)
    torch.testing.assert_close(dense[others], expected_tail[others])


def test_full_topk_is_the_exact_teacher():
    student, _, _, lq = _teacher_topk()
    vals, ids = lq.topk(50, -1)                                                          # K = V
    dense = topk_to_dense_logprobs(ids, vals, 50)
    torch.testing.assert_close(dense, lq, rtol=0, atol=1e-6)
    teacher_logits = lq + 3.0                                                            # any logits of q
    torch.testing.assert_close(topk_reverse_kl(student, ids, vals), opd_kernels.reverse_kl(student, teacher_logits),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [1, 6, 49])
def test_topk_reverse_kl_equals_reverse_kl_against_the_dense_rows(K):
    student, ids, vals, _ = _teacher_topk(K=K)
    dense = topk_to_dense_logprobs(ids, vals, 50)
    a = student.clone().requires_grad_(True)
    kl = topk_reverse_kl(a, ids, vals)
    b = student.clone().requires_grad_(True)
    ref = opd_kernels.reverse_kl(b, dense)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
    w = torch.linspace(0.5, 2.0, 5)                                                      # non-uniform upstream
    (ga,) = torch.autograd.grad((kl * w).sum(), a)
    (gb,) = torch.autograd.grad((ref * w).sum(), b)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_topk_reverse_kl_temperature_scales_only_the_student():
    student, ids, vals, _ = _teacher_topk()
    T = 0.7
    dense = topk_to_dense_logprobs(ids, vals, 50).double()
    p = torch.softmax(student.double() / T, -1)
    expected = (p * (p.log() - dense)).sum(-1)                                           # float64 oracle
    torch.testing.assert_close(topk_reverse_kl(student, ids, vals, temperature=T).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_masked_rows_are_zero_and_may_hold_garbage():
    student, ids, vals, _ = _teacher_topk()
    mask = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    ids = ids.clone()
    vals = vals.clone()
    ids[1] = -7                                                                          # padding
    vals[3] = float("nan")
    kl = topk_reverse_kl(student, ids, vals, mask=mask)
    assert bool((kl[~mask] == 0).all()) and bool((kl[mask] > 0).all())
    clean_student, clean_ids, clean_vals, _ = _teacher_topk()
    torch.testing.assert_close(kl[mask], topk_reverse_kl(clean_student, clean_ids, clean_vals)[mask])


def test_bad_topk_gets_a_clear_error():
    student, ids, vals, _ = _teacher_topk()
    with pytest.raises(ValueError, match=r"must lie in \[0, 40\)"):
        topk_to_dense_logprobs(ids, vals, 40)
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="repeat within a row"):
        topk_reverse_kl(student, dup, vals)
    with pytest.raises(ValueError, match="sum to more than 1"):
        topk_to_dense_logprobs(ids, vals + 1.0, 50)                                      # logits, not log-probs
    with pytest.raises(TypeError, match="integer tensor"):
        topk_to_dense_logprobs(ids.float(), vals, 50)
    with pytest.raises(ValueError, match="share the leading dims"):
        topk_reverse_kl(student[:3], ids, vals)


def test_peaked_teacher_keeps_a_finite_tail():
    ids = torch.tensor([[3, 1]])
    vals = torch.tensor([[0.0, -40.0]])                                                  # top-1 holds all the mass
    dense = topk_to_dense_logprobs(ids, vals, 10)
    assert bool(torch.isfinite(dense).all())
    assert math.isclose(float(dense[0, 0]), math.log(1e-12 / 8), rel_tol=1e-5)
