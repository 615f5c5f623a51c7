"""Prompts of the prune-and-heal experiment, generated locally (no dataset download), with a held-out split.

Short questions an instruction-tuned 135M model answers in a few words: arithmetic, capitals, opposites, colours,
spelling and one-sentence instructions. A prompt is held out by a fixed hash of its text (~20%), so the split does
not depend on the order or on the number of prompts drawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import random

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens",
            "Portugal": "Lisbon", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
            "Austria": "Vienna", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "India": "New Delhi",
            "Mexico": "Mexico City", "Turkey": "Ankara", "Chile": "Santiago", "Finland": "Helsinki"}
WORDS = ["hot", "big", "fast", "happy", "light", "early", "open", "full", "hard", "young", "rich", "strong",
         "high", "wet", "loud", "clean", "thick", "sweet", "near", "old"]
THINGS = ["the sky", "grass", "snow", "a banana", "a tomato", "coal", "the sun", "an orange", "milk", "a lemon"]
TOPICS = ["the ocean", "a cat", "winter", "music", "the moon", "trees", "rain", "a train", "bread", "friendship",
          "mountains", "a library", "coffee", "the city", "birds"]
TEMPLATES = [
    lambda r: f"What is {r.randint(2, 30)} plus {r.randint(2, 30)}?",
    lambda r: f"What is {r.randint(2, 12)} times {r.randint(2, 12)}?",
    lambda r: f"What is {r.randint(20, 60)} minus {r.randint(1, 19)}?",
    lambda r: f"What is the capital of {r.choice(list(CAPITALS))}?",
    lambda r: f"What is the opposite of '{r.choice(WORDS)}'?",
    lambda r: f"What color is {r.choice(THINGS)}?",
    lambda r: f"Spell the word '{r.choice(WORDS)}' backwards.",
    lambda r: f"Write one short sentence about {r.choice(TOPICS)}.",
    lambda r: f"Give one word that rhymes with '{r.choice(WORDS)}'.",
]


# The system turn of every prompt (teacher, student, training and evaluation alike). SmolLM2's template would
# otherwise insert its own 20-token default; this one is shorter and asks for the short answers a 16-token
# response budget can hold.
SYSTEM = "Answer briefly."


def messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] < 52          # ~20%


def sample_prompts(n: int, *, held: bool, seed: int) -> list[str]:
    """``n`` distinct prompts of one split (training or held-out), drawn deterministically."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(200 * n):
        p = rng.choice(TEMPLATES)(rng)
        if p not in seen and held_out(p) == held:
            seen.add(p)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct {'held-out' if held else 'training'} prompts; ask for fewer")


def write_prompt_file(path: str, prompts: list[str]) -> str:
    """JSONL with a chat ``messages`` field (``--input-key messages --apply-chat-template``)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"messages": messages(p)}) + "\n")
    return path
