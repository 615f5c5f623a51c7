"""Helpers of the Megatron backend tests (imported by conftest.py and the test modules): tiny HF models,
the worker launcher, result loading, transformers reference log-probs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_worker.py")
VOCAB = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_model(family: str, directory: str, seed: int, **overrides):
    """A tiny random HF model with every weight perturbed (norm weights too, so a mis-mapped norm shows)."""
    import transformers
    classes = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
    config_cls, model_cls = classes[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    if family == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    # A tokenizer-side file, to check that conversions and exports carry tokenizer files along.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512, "marker": family}, f)
    return directory


def write_tokenizer(directory: str, n_tokens: int) -> None:
    """A tokenizer.json of ``n_tokens`` word-level tokens (ids 0..n-1), for the tokenizer-equality check of
    padded teacher vocabularies; a vocabulary of the model's size or smaller (Qwen: 151665 ids, 151936 rows)."""
    vocab = {f"t{i}": i for i in range(n_tokens)}
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
                   "added_tokens": []}, f)


def run_worker(out_dir: str, spec: dict, scenarios: list[str], *, world: int = 1, timeout: int = 420,
               expect_killed: bool = False) -> int:
    """Run ``_worker.py`` scenarios in a fresh process group; returns the exit code."""
    os.makedirs(out_dir, exist_ok=True)
    spec_path = os.path.join(out_dir, f"spec-{'-'.join(scenarios)}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, WORKER, "--world", str(world), "--port", str(_free_port()), "--out", out_dir,
           "--spec", spec_path, *scenarios]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        env["CUDA_VISIBLE_DEVICES"] = ""     # one GPU per rank or none: fewer GPUs than ranks -> the CPU path
    log_path = os.path.join(out_dir, f"log-{'-'.join(scenarios)}.txt")
    # Output goes to a file, not a pipe: a helper process that outlives a killed worker would hold a pipe open.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        finally:
            # Megatron's checkpoint writer leaves a multiprocessing manager behind when its parent is killed:
            # end every process of the worker's own session (started by us above).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    with open(log_path) as f:
        output = f.read()
    if proc.returncode != 0 and not expect_killed:
        raise RuntimeError(f"worker {scenarios} failed with code {proc.returncode}:\n{output[-6000:]}")
    return proc.returncode


def load_result(out_dir: str, name: str) -> dict:
    """A scenario's results; a scenario that raised fails the asking test with its traceback."""
    err = os.path.join(out_dir, f"{name}.err")
    if os.path.exists(err):
        with open(err) as f:
            pytest.fail(f"worker scenario {name!r} raised:\n{f.read()}")
    path = os.path.join(out_dir, f"{name}.pt")
    if not os.path.exists(path):
        pytest.fail(f"worker scenario {name!r} wrote no result (see the worker log in {out_dir})")
    return torch.load(path, weights_only=False)


def hf_logprobs(hf_dir: str, tokens: list[list[int]], response_lengths: list[int], temperature: float = 1.0,
                dtype=torch.float64):
    """Reference response log-probs (and full log-softmax rows) from transformers, one unpacked sample at a time."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(dtype).eval()
    out, rows = [], []
    with torch.no_grad():
        for toks, r in zip(tokens, response_lengths):
            logits = model(torch.tensor([toks])).logits[0].to(dtype) / temperature
            logp = torch.log_softmax(logits, -1)[len(toks) - r - 1: len(toks) - 1]
            rows.append(logp)
            out.append(logp.gather(-1, torch.tensor(toks[len(toks) - r:])[:, None])[:, 0])
    return out, rows
