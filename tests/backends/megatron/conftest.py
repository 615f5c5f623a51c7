"""Fixtures of the Megatron backend tests (helpers in mg_helpers.py).

Megatron state is process-global (parallel groups, RNG tracker), so everything that initialises it runs in
worker processes (``_worker.py``), a few launches per session: importing Megatron costs ~6 s per process.
The tests read the workers' result files and assert. Tiny random HF models are built in this process
(transformers, no downloads) and handed to the workers as directories.
"""
from __future__ import annotations

import pytest
from mg_helpers import hf_model, run_worker, write_tokenizer


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    specs = {
        "qwen3": ("qwen3", 1, {}),
        "qwen3_tied": ("qwen3", 2, {"tie_word_embeddings": True}),
        "qwen2": ("qwen2", 3, {}),
        "llama": ("llama", 4, {}),
        # Teachers: another family and size than the student (same vocabulary), two "iterations".
        "teacher_a": ("llama", 5, dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                       num_attention_heads=6, num_key_value_heads=3)),
        "teacher_b": ("llama", 6, dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                       num_attention_heads=6, num_key_value_heads=3)),
        "bad_vocab": ("qwen3", 7, {"vocab_size": 128}),
        # A teacher of another hidden size that TP=2 can shard (the fused output layer's TP test).
        "teacher_tp": ("llama", 12, dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2)),
        # Real vocabulary sizes (the big_vocab scenario): SmolLM2's, and Qwen's with a padded teacher embedding.
        "big_49152": ("llama", 8, {"vocab_size": 49152, "tie_word_embeddings": True}),
        "big_teacher_49152": ("llama", 9, {"vocab_size": 49152, "tie_word_embeddings": True}),
        "big_151936": ("qwen3", 10, {"vocab_size": 151936}),
        "big_teacher_152064": ("qwen3", 11, {"vocab_size": 152064}),
    }
    models = {name: hf_model(fam, str(root / name), seed, **kw) for name, (fam, seed, kw) in specs.items()}
    pairs = (("big_49152", "big_teacher_49152", 49152), ("big_151936", "big_teacher_152064", 151665))
    for student, teacher, n in pairs:
        for name in (student, teacher):         # one tokenizer per pair (the padded teacher is checked against it)
            write_tokenizer(models[name], n)
    return models


@pytest.fixture(scope="session")
def mg_out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("megatron"))


@pytest.fixture(scope="session")
def single_run(hf_models, mg_out):
    """One single-process launch: conversion, packing, TP1/DP1 reference, uninterrupted run, teacher, critic..."""
    run_worker(mg_out, {"hf": hf_models},
               ["convert", "packing", "parallel_ref", "resume_a", "teacher", "fused_forward", "kl_loss", "critic",
                "fused_vs_materialised", "frozen"])
    return mg_out


@pytest.fixture(scope="session")
def parallel_run(hf_models, mg_out, single_run):
    """One 2-process launch: the same training steps with TP=2, then with DP=2; then the fused output layer vs the
    materialised logits at TP=2."""
    run_worker(mg_out, {"hf": hf_models}, ["parallel", "fused_vs_materialised"], world=2)
    return mg_out


@pytest.fixture(scope="session")
def resume_run(hf_models, mg_out, single_run):
    """A save killed half-way (its own process, SIGKILLed), then one launch resuming both checkpoints."""
    code = run_worker(mg_out, {"hf": hf_models}, ["crash"], expect_killed=True)
    run_worker(mg_out, {"hf": hf_models}, ["resume_b", "after_crash"])
    return mg_out, code


