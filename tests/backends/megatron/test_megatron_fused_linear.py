"""The trainer's fused output layer (final hidden states + ``opd_kernels.fused_linear_logprobs``, chunked over
tokens) against the materialised path (Megatron's output layer, [S, V / TP] logits, then the row ops): the same
forward results, losses, gradient norms and updated weights, at TP=1 (single-process launch) and TP=2 (2-process
launch); default chunk and 7-row chunks (several per micro-batch). Tied embeddings (the head is the embedding),
a Megatron teacher of another size (exact KL loss) and an SGLang-style teacher's top-K rows (top-K KL loss)."""
from __future__ import annotations

import os

import pytest
import torch
from mg_helpers import load_result

ATOL = 2e-5   # fp32: chunked matmuls and sums in another order move the last bits


@pytest.fixture(scope="module")
def tp1(single_run):
    return load_result(single_run, "fused_vs_materialised")


@pytest.fixture(scope="module")
def tp2(parallel_run):
    err = os.path.join(parallel_run, "fused_vs_materialised.err")
    if os.path.exists(err):
        pytest.fail(open(err).read())
    return [torch.load(os.path.join(parallel_run, f"fused_vs_materialised_tp2_rank{r}.pt"), weights_only=False)
            for r in (0, 1)]


def _same_rows(a: dict, b: dict, keys) -> None:
    for key in keys:
        for x, y in zip(a[key], b[key]):
            assert (x - y).abs().max().item() <= ATOL, key


def _same_run(a: dict, b: dict) -> None:
    _same_rows(a["forward"], b["forward"], ("logprobs", "advantages", "opd_kl", "teacher_logprobs"))
    _same_rows(a["plain"], b["plain"], ("logprobs", "entropy"))
    for step in ("m1", "m2"):
        for key in ("loss", "pg_loss", "opd_kl", "grad_norm", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=ATOL), (step, key)
    assert max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"]) <= ATOL


def _nontrivial(run: dict) -> None:
    assert run["m1"]["opd_kl"] > 0.05 and run["m2"]["opd_kl"] > 0.05
    assert run["m1"]["grad_norm"] > 0.1 and run["m2"]["update_successful"] == 1.0


def test_fused_equals_materialised_single_process(tp1):
    _nontrivial(tp1["materialised"])
    for name in ("fused", "fused_7"):
        _same_run(tp1["materialised"], tp1[name])


def test_fused_equals_materialised_under_tensor_parallelism(tp2, tp1):
    for rank in (0, 1):
        for name in ("fused", "fused_7"):
            _same_run(tp2[rank]["materialised"], tp2[rank][name])
        _same_run(tp1["materialised"], tp2[rank]["fused"])          # and TP=2 fused == TP=1 materialised
