"""A training step with TP=2 and with DP=2 (2 gloo processes) equals TP=1/DP=1 on the same global batch.

Both layouts run in ONE 2-process launch (TP=2 first, then the groups are rebuilt as DP=2); the reference runs
in the single-process launch. Two optimizer steps (sample-mean with an entropy bonus, then token-mean) with
several packed micro-batches per rank, grad clipping and the distributed optimizer.
"""
from __future__ import annotations

import os

import pytest
import torch
from mg_helpers import load_result
from safetensors.torch import load_file

ATOL = 2e-5   # fp32: different reduction orders (vocab-parallel softmax, DP all-reduce) move the last bits


@pytest.fixture(scope="module")
def runs(parallel_run):
    ref = load_result(parallel_run, "parallel_ref")
    err = os.path.join(parallel_run, "parallel.err")
    if os.path.exists(err):
        pytest.fail(open(err).read())
    tp = [torch.load(os.path.join(parallel_run, f"parallel_tp2_rank{r}.pt"), weights_only=False) for r in (0, 1)]
    dp = [torch.load(os.path.join(parallel_run, f"parallel_dp2_rank{r}.pt"), weights_only=False) for r in (0, 1)]
    return ref, tp, dp


def _close_weights(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _close_metrics(a: dict, b: dict, keys=("loss", "pg_loss", "grad_norm", "entropy", "clipfrac", "num_tokens")):
    for key in keys:
        if key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=ATOL), key


def test_reference_run_is_nontrivial(runs):
    ref, _, _ = runs
    assert ref["microbatches"] >= 2
    assert ref["m1"]["grad_norm"] > 0.5        # clip_grad=0.5 is active
    assert 0 < ref["m2"]["clipfrac"] < 1


def test_tensor_parallel_equals_single_process(runs, hf_models):
    ref, tp, _ = runs
    for rank in (0, 1):
        for key in ("logprobs", "entropy"):
            for a, b in zip(ref[key], tp[rank][key]):
                assert (a - b).abs().max().item() <= ATOL
        _close_metrics(ref["m1"], tp[rank]["m1"])
        _close_metrics(ref["m2"], tp[rank]["m2"])
        assert _close_weights(ref["weights"], tp[rank]["weights"]) <= ATOL
    # The steps really moved the weights, by far more than the tolerance.
    initial = load_file(os.path.join(hf_models["qwen3"], "model.safetensors"))
    assert _close_weights(initial, ref["weights"]) > 100 * ATOL


def test_data_parallel_equals_single_process(runs):
    ref, _, dp = runs
    for rank in (0, 1):
        for i, a, b in zip(dp[rank]["idx"], dp[rank]["logprobs"], dp[rank]["entropy"]):
            assert (ref["logprobs"][i] - a).abs().max().item() <= ATOL
            assert (ref["entropy"][i] - b).abs().max().item() <= ATOL
        _close_metrics(ref["m1"], dp[rank]["m1"])
        _close_metrics(ref["m2"], dp[rank]["m2"])
        assert _close_weights(ref["weights"], dp[rank]["weights"]) <= ATOL
    assert sorted(dp[0]["idx"] + dp[1]["idx"]) == list(range(len(ref["idx"])))
