"""Tiny Qwen3 model configs of the CPU experiment and their supervised fine-tuning (plain PyTorch), cached.

The teacher and the student are real ``transformers`` ``Qwen3ForCausalLM`` models saved as HF directories
(safetensors + config + the task's tokenizer), so the same files feed our CPU engine, the Megatron trainer and
the HF <-> torch_dist converter. SFT results are cached under a hash of every setting that affects them (the
model, the optimisation, the data seed and the task version); a cache entry is written to a temporary directory
and renamed, so an interrupted SFT never leaves a half-written model behind.

Settings (measured on this 2-core machine, see README): rope_theta 1e4 (the default 1e6 learns the carry much
more slowly at these sizes), AdamW with a short warmup and grad clip 1.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import task
from .tokenizer import EOS_ID, MODEL_VOCAB_SIZE, PAD_ID, encode, save_tokenizer

TASK_VERSION = "add3-all-reversed-v1"


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class TinyModel:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def hf_config(self) -> dict:
        from transformers import Qwen3Config
        cfg = Qwen3Config(vocab_size=MODEL_VOCAB_SIZE, hidden_size=self.hidden, intermediate_size=self.intermediate,
                          num_hidden_layers=self.layers, num_attention_heads=self.heads,
                          num_key_value_heads=self.heads, head_dim=self.hidden // self.heads,
                          max_position_embeddings=64, rope_theta=1e4, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        return cfg.to_dict()


@dataclass(frozen=True)
class SFTSettings:
    model: TinyModel
    steps: int
    lr: float
    batch_size: int
    seed: int
    warmup: int = 50
    # Warmup-stable-decay: constant lr after the warmup, then a cosine decay from this step to 0 at ``steps``
    # (None: constant to the end). Constant-lr iterates of these models swing by +-10 points of accuracy; the
    # decay settles the teacher at 99.8% held-out with confident answers.
    decay_start: int | None = None
    # Stop early once greedy accuracy on a validation sample of training-side pairs reaches this (checked every
    # ``check_every`` steps): the student's SFT is stopped at a target strength, which is far more reproducible
    # than a fixed step count (the carry is learnt in a sharp, seed-dependent transition).
    stop_at_accuracy: float | None = None
    check_every: int = 10

    def key(self) -> str:
        blob = json.dumps({"task": TASK_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _batch(pairs: list[task.Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and labels [B, L] (-100 outside the answer + end token)."""
    seqs = [(encode(p.prompt), encode(p.answer) + [EOS_ID]) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), width), PAD_ID)
    labels = torch.full((len(seqs), width), -100)
    for i, (prompt, answer) in enumerate(seqs):
        ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model, pairs: list[task.Pair], max_new_tokens: int = 6) -> float:
    """Exact-match accuracy of greedy answers (all task prompts have the same length: no padding needed)."""
    model.eval()
    ids = torch.tensor([encode(p.prompt) for p in pairs])
    done = torch.zeros(len(pairs), dtype=torch.bool)
    out = []
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        out.append(nxt)
        done |= nxt == EOS_ID
        ids = torch.cat([ids, nxt[:, None]], 1)
        if done.all():
            break
    rows = torch.stack(out, 1).tolist()
    correct = [r[:r.index(EOS_ID)] == encode(p.answer) if EOS_ID in r else False for r, p in zip(rows, pairs)]
    return sum(correct) / len(pairs)


def _lr_factor(settings: SFTSettings, step: int) -> float:
    warm = min(1.0, (step + 1) / settings.warmup)
    if settings.decay_start is None or step < settings.decay_start:
        return warm
    progress = (step - settings.decay_start) / max(1, settings.steps - settings.decay_start)
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_sft(settings: SFTSettings, *, log=_say) -> torch.nn.Module:
    """Cross-entropy on the answer tokens of fresh training-side pairs every step."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(Qwen3Config(**settings.model.hf_config()))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(settings, s))
    rng = random.Random(settings.seed)
    validation = task.sample_pairs(random.Random(settings.seed + 999), 256, held_out=False)
    model.train()
    for step in range(settings.steps):
        ids, labels = _batch(task.sample_pairs(rng, settings.batch_size, held_out=False))
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if settings.stop_at_accuracy is not None and (step + 1) % settings.check_every == 0:
            acc = greedy_accuracy(model, validation)
            model.train()
            if acc >= settings.stop_at_accuracy:
                log(f"  sft step {step + 1}: validation accuracy {acc:.1%} >= {settings.stop_at_accuracy:.0%}, stop")
                break
        elif (step + 1) % max(1, settings.steps // 4) == 0:
            log(f"  sft step {step + 1}/{settings.steps} loss {loss.item():.3f}")
    model.sft_steps = step + 1
    return model


def build_sft_model(settings: SFTSettings, cache_dir: str, name: str, *, eval_pairs: list[task.Pair],
                    log=_say) -> tuple[str, dict]:
    """The HF directory of an SFT model (trained now, or from the cache) and its metadata (accuracy, time)."""
    final = os.path.join(os.path.expanduser(cache_dir), f"{name}-{settings.key()}")
    meta_path = os.path.join(final, "sft.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return final, json.load(f)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    log(f"[experiment] SFT of the {name} ({settings.model}, {settings.steps} steps; cached in {final})")
    start = time.perf_counter()
    model = train_sft(settings, log=log)
    seconds = time.perf_counter() - start
    meta = {"name": name, "settings": asdict(settings), "sft_seconds": round(seconds, 1),
            "sft_steps": model.sft_steps,
            "greedy_accuracy": greedy_accuracy(model, eval_pairs),
            "params": sum(p.numel() for p in model.parameters())}
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_quietly(model, tmp)
    save_tokenizer(tmp)
    with open(os.path.join(tmp, "sft.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log(f"[experiment] {name}: {meta['greedy_accuracy']:.1%} held-out greedy accuracy after {seconds:.0f} s")
    return final, meta


def _save_quietly(model, directory: str) -> None:
    """save_pretrained without its "Writing model shards" progress bar (the experiment's terminal has its own)."""
    with hf_progress_bars_off():
        model.save_pretrained(directory, safe_serialization=True)


@contextlib.contextmanager
def hf_progress_bars_off():
    """transformers' progress bars off inside the block, then as they were."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
