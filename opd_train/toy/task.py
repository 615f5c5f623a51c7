"""The toy task of the CPU experiment: 3-digit addition, every number written least-significant digit first.

123 + 456 = 579 is written ``321+654=`` -> ``975$`` (then the end token). With operands and sum reversed, output
digit i depends on operand digits i and the carry from digit i-1, at fixed relative positions, so a small RoPE
model can learn it (measured here: a 4-layer d128 Qwen3 reaches ~99% in 400 SFT steps of 128 samples; with the
operands in natural order it needs about twice the samples). A model that has not learnt the carry gets most
carrying sums wrong: a clear, measurable gap between a weak and a strong model.

A fixed hash holds out ~2.3% of the 10^6 operand pairs; evaluation uses only held-out pairs, training never sees
them (SFT and RL draw from the rest). The tokenizer (:mod:`.tokenizer`) is character level, saved in HF format so
the engines (transformers) and the trainer (Megatron) agree on every id.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass

DIGITS = 3
HOLDOUT_BYTE = 6          # pair held out when sha256 byte 0 < 6: 6/256 = 2.3%


def is_held_out(a: int, b: int) -> bool:
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] < HOLDOUT_BYTE


def prompt_text(a: int, b: int) -> str:
    return f"{a:0{DIGITS}d}"[::-1] + "+" + f"{b:0{DIGITS}d}"[::-1] + "="


def answer_text(a: int, b: int) -> str:
    """The label: the sum's digits reversed (the end token is not part of the label)."""
    return str(a + b)[::-1]


@dataclass(frozen=True)
class Pair:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return prompt_text(self.a, self.b)

    @property
    def answer(self) -> str:
        return answer_text(self.a, self.b)


def sample_pairs(rng: random.Random, n: int, *, held_out: bool) -> list[Pair]:
    """``n`` operand pairs from the held-out (eval) or the training side of the split."""
    out: list[Pair] = []
    top = 10 ** DIGITS
    while len(out) < n:
        a, b = rng.randrange(top), rng.randrange(top)
        if is_held_out(a, b) == held_out:
            out.append(Pair(a, b))
    return out


def write_prompts(path: str, pairs: list[Pair]) -> str:
    """JSONL with ``prompt`` / ``label`` columns (what ``--prompt-data`` / ``--eval-prompt-data`` read)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "label": p.answer}) + "\n")
    os.replace(tmp, path)
    return path


def write_task_files(directory: str, *, train_prompts: int, eval_prompts: int, seed: int) -> tuple[str, str]:
    """Training and held-out prompt files of the experiment (deterministic in ``seed``)."""
    os.makedirs(directory, exist_ok=True)
    train = write_prompts(os.path.join(directory, "train.jsonl"),
                          sample_pairs(random.Random(seed), train_prompts, held_out=False))
    evals = write_prompts(os.path.join(directory, "eval.jsonl"),
                          sample_pairs(random.Random(seed + 1), eval_prompts, held_out=True))
    return train, evals
