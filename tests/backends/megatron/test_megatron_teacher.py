"""Megatron teacher mode, reference model, critic and bf16 (single-process launch)."""
from __future__ import annotations

import pytest
import torch
from mg_helpers import hf_logprobs, load_result, run_worker


@pytest.fixture(scope="module")
def teacher(single_run):
    return load_result(single_run, "teacher")


def _max_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert [g.shape for g in got] == [e.shape for e in expected]
    return max((g.double() - e.double()).abs().max().item() for g, e in zip(got, expected))


def test_teacher_of_another_size_and_the_asked_iteration(teacher, hf_models):
    """--opd-teacher-ckpt-step 3 loads iteration 3 (teacher_a); the default loads the latest, 7 (teacher_b).

    The teacher is a 3-layer Llama of hidden 96; the student a 2-layer Qwen3 of hidden 64.
    """
    batch, temp = teacher["batch"], teacher["temperature"]
    args = (batch["tokens"], batch["response_lengths"])
    ref_a, rows_a = hf_logprobs(hf_models["teacher_a"], *args, temperature=temp)
    ref_b, rows_b = hf_logprobs(hf_models["teacher_b"], *args, temperature=temp)
    student, rows_s = hf_logprobs(hf_models["qwen3"], *args, temperature=temp)
    assert _max_diff(teacher["step3"]["teacher_logprobs"], ref_a) <= 1e-5
    assert _max_diff(teacher["step7"]["teacher_logprobs"], ref_b) <= 1e-5
    assert _max_diff(teacher["step3"]["teacher_logprobs"], ref_b) > 1e-2     # the two iterations really differ
    assert _max_diff(teacher["step7"]["logprobs"], student) <= 1e-5
    # the exact KL(student || teacher) over the whole vocabulary, from both logit rows (the fused op).
    exact = [(s.exp() * (s - t)).sum(-1) for s, t in zip(rows_s, rows_b)]
    assert _max_diff(teacher["step7"]["opd_kl"], exact) <= 1e-5
    assert all((k > 0).all() for k in teacher["step7"]["opd_kl"])


def test_teacher_errors_are_clear(teacher):
    errors = teacher["errors"]
    assert errors["missing"].startswith("FileNotFoundError") and "iteration 5" in errors["missing"]
    assert "[3, 7]" in errors["missing"]                     # lists what is available
    assert "vocab_size=128" in errors["vocab"] and "256" in errors["vocab"]
    assert "needs TrainerSettings.opd" in errors["opd_without_settings"]
    assert "exactly one teacher" in errors["two_teachers"]


def test_student_weights_stay_live_after_loading_teachers(teacher):
    assert teacher["student_unchanged"] is True


def test_teacher_equal_to_student_gives_zero_penalty(teacher):
    assert max(kl.abs().max().item() for kl in teacher["same_exact_kl"]) <= 1e-6   # exact KL of identical rows
    same = teacher["same"]
    for lp, tlp, kl, adv in zip(same["logprobs"], same["teacher_logprobs"], same["opd_kl"], same["advantages"]):
        assert torch.equal(lp, tlp)                      # same weights, same micro-batch: identical rows
        assert kl.abs().max().item() == 0.0 and adv.abs().max().item() == 0.0      # the fused op's k1 and A'
    penalty = teacher["same_penalty"]
    assert penalty["kl"].abs().max().item() == 0.0
    assert penalty["advantages"].abs().max().item() == 0.0


@pytest.fixture(scope="module")
def fused(single_run):
    return load_result(single_run, "fused_forward")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_the_opd_forward_runs_the_fused_op_and_equals_the_unfused_path(fused, estimator):
    """The trainer's OPD forward dispatches opd_kernels::opd_sampled_fwd once per chunk of token rows (a profiler
    trace of MegatronTrainer.forward, the call the driver makes; the fused output layer's default chunk holds a
    whole micro-batch at V = 256, so once per micro-batch), computes the student's log-probs with it (no separate
    token_logprobs pass over the student: the one token_logprobs per chunk is the Megatron teacher's), and equals
    token_logprobs of both models + algo.apply_opd; an SGLang teacher's rows give the same result."""
    r, n_mbs = fused[estimator], fused["microbatches"]
    assert n_mbs > 1
    assert r["ops"].get("opd_kernels::opd_sampled_fwd") == n_mbs
    assert r["ops"].get("opd_kernels::token_logprobs_fwd") == n_mbs           # the teacher's token log-probs
    f = r["fused"]
    assert _max_diff(f["logprobs"], r["unfused_student"]) <= 1e-6
    lengths = [len(x) for x in f["advantages"]]
    unfused_adv = [r["unfused_advantages"][i, :n] for i, n in enumerate(lengths)]
    unfused_kl = [r["unfused_kl"][i, :n] for i, n in enumerate(lengths)]
    assert _max_diff(f["advantages"], unfused_adv) <= 1e-5 and _max_diff(f["opd_kl"], unfused_kl) <= 1e-5
    assert _max_diff(f["advantages"], fused["base"]) > 1e-2                   # the penalty really is applied
    for key in ("logprobs", "advantages", "opd_kl", "teacher_logprobs"):
        assert _max_diff(r["rows"][key], f[key]) == 0.0


def test_the_opd_forward_runs_once_per_chunk_with_the_same_results(fused):
    """16-row chunks (BatchingSettings.fused_linear_chunk_tokens): opd_sampled_fwd and the teacher's token
    log-probs run once per chunk of each micro-batch's response rows (prompt rows skip the output layer), and the
    results equal the one-chunk-per-micro-batch run."""
    chunks = fused["chunks"]
    assert chunks > 2 * fused["microbatches"]
    assert fused["chunked_ops"].get("opd_kernels::opd_sampled_fwd") == chunks
    assert fused["chunked_ops"].get("opd_kernels::token_logprobs_fwd") == chunks
    for key in ("logprobs", "advantages", "opd_kl", "teacher_logprobs"):
        assert _max_diff(fused["chunked"][key], fused["k1"]["fused"][key]) <= 1e-6, key


@pytest.fixture(scope="module")
def kl_loss(single_run):
    return load_result(single_run, "kl_loss")


def test_exact_kl_loss_value_and_learning(kl_loss):
    """opd_full_kl_coef=1 with zero advantages: the loss IS the sample-mean exact KL, and training lowers it."""
    masks = kl_loss["batch"]["loss_masks"]
    per_sample = [(kl * torch.tensor(m)).sum() / sum(m) for kl, m in zip(kl_loss["forward_kl"], masks)]
    expected = float(torch.stack(per_sample).mean())
    m = kl_loss["m_teacher"]
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["pg_loss"] == pytest.approx(0.0, abs=1e-7)
    token_mean = float(sum((k * torch.tensor(mm)).sum() for k, mm in zip(kl_loss["forward_kl"], masks))
                       / sum(sum(mm) for mm in masks))
    assert m["opd_kl"] == pytest.approx(token_mean, rel=1e-5)
    assert kl_loss["later_kl"][-1] < 0.7 * m["opd_kl"]


def test_exact_kl_loss_from_the_teacher_distribution_rows_equals_megatron_teacher(kl_loss):
    """The same step with the teacher's full distribution as top-K rows (K = V, an SGLang teacher's), through the
    top-K kernel: the forward KL and the training step equal the Megatron teacher's."""
    assert _max_diff(kl_loss["forward_kl_rows"], kl_loss["forward_kl"]) <= 2e-5
    a, b = kl_loss["m_teacher"], kl_loss["m_rows"]
    for key in ("loss", "opd_kl", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    # Adam's first step is ~lr * sign(g): fp32 noise in near-zero gradients moves a few weights by << lr = 3e-3.
    wa, wb = kl_loss["w_teacher"], kl_loss["w_rows"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4


@pytest.fixture(scope="module")
def critic(single_run):
    return load_result(single_run, "critic")


def test_reference_model_scores_like_the_initial_student(critic):
    assert all(torch.equal(a, b) for a, b in zip(critic["logprobs"], critic["ref_logprobs"]))
    m = critic["ref_kl_metrics"]
    assert m["ref_kl"] == pytest.approx(0.0, abs=1e-7) and m["update_successful"] == 1.0


def test_critic_learns_returns_without_touching_the_actor(critic):
    assert all(v.abs().max().item() == 0.0 for v in critic["values"])    # zero-initialised value head
    losses = critic["value_losses"]
    assert losses[-1] < losses[0] / 3
    assert critic["actor_unchanged"] is True
    assert all(v.abs().max().item() > 0.1 for v in critic["values_after"])
    assert critic["critic_iterations"] == [1]


def test_critic_resumes_with_the_non_distributed_optimizer(critic):
    """The critic (Megatron's non-distributed optimizer) saved at step 1 and reloaded in a new trainer."""
    assert all(torch.equal(a, b) for a, b in zip(critic["values_after"], critic["resumed_values"]))
    first, second = critic["next_loss"]
    assert second == pytest.approx(first, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(*critic["next_values"]))


def test_bf16_training_step(critic):
    m = critic["bf16_metrics"]
    assert m["update_successful"] == 1.0 and torch.isfinite(torch.tensor(m["loss"]))
    assert critic["bf16_dtype"] == "torch.bfloat16"
    assert critic["bf16_changed"] > 0.5
    # bf16 log-probs stay close to the fp32 ones of the same weights.
    assert max((a - b).abs().max().item() for a, b in zip(critic["bf16_logprobs"], critic["logprobs"])) < 0.1


@pytest.fixture(scope="module")
def big(hf_models, mg_out):
    run_worker(mg_out, {"hf": hf_models}, ["big_vocab"])
    return load_result(mg_out, "big_vocab")


@pytest.mark.parametrize("name", ["v49152", "v151936"])
def test_real_vocabulary_sizes_through_the_fused_training_paths(big, name):
    """V = 49152 and V = 151936 (its teacher padded to 152064): the trainer's fused forward equals the float64 KL
    of the HF models over the student's columns, the exact-KL and the top-K train steps lower their KL, and the
    top-32 + tail KL is a lower bound of the exact one."""
    r = big[name]
    assert r["vocab"] == int(name[1:]) and r["teacher_vocab"] >= r["vocab"]
    for got, want, mask in zip(r["forward_kl"], r["exact"], r["loss_masks"]):
        keep = torch.tensor(mask, dtype=torch.bool)
        assert _max_diff([got[keep]], [want[keep]]) <= 2e-4 * max(1.0, float(want.abs().max()))
    assert r["train_kl"][-1] < 0.9 * r["train_kl"][0], r["train_kl"]
    assert r["topk_train_kl"][-1] < 0.9 * r["topk_train_kl"][0], r["topk_train_kl"]
    for topk, exact in zip(r["topk_forward_kl"], r["forward_kl"]):
        assert bool((topk <= exact + 1e-4).all())
