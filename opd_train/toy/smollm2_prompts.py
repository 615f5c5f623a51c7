"""Prompts of the prune-and-heal experiment, generated locally (no dataset download), with a held-out split.

Short questions the teacher answers in a few tokens and then ends its turn: sums, capitals, first and last
letters, opposites. A prompt is held out by a fixed hash of its text (~20%), so the split does
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
         "high", "wet", "loud", "clean", "thick", "sweet", "near", "old", "good", "dark", "cold", "tall", "apple",
         "house", "river", "green", "table", "music", "water", "paper", "money", "bread", "chair", "phone",
         "pencil", "garden", "window", "orange", "summer", "winter", "friend", "school", "doctor", "yellow"]
ADJECTIVES = WORDS[:24] + ["slow", "small", "short", "new", "soft", "low", "empty", "heavy", "quiet", "dirty", "thin",
                           "weak", "poor", "late", "sad", "far"]
# Each family gets answers of a few tokens ending with the end-of-turn token from the teacher (probed: "29 + 14 =
# 31", "The capital of Spain is Madrid.", "The first letter of 'big' is 'B'.", "The opposite of 'hot' is 'cold'."),
# so the exact agreement of greedy answers is a reachable measure. Whether the teacher is right does not matter: the
# student learns the teacher ("The last letter of 'doctor' is 'D'."). Families that the teacher answers at length
# (times, minus, colours, rhymes, the next weekday) are out, and so are animals' legs, whose teacher answers vary in
# form ("A cow has five legs.", "The answer is 1."); opposites, which a mildly pruned student partly keeps, took
# their place.
TEMPLATES = [
    lambda r: f"What is {r.randint(2, 40)} plus {r.randint(2, 40)}?",
    lambda r: f"What is the capital of {r.choice(list(CAPITALS))}?",
    lambda r: f"What is the first letter of '{r.choice(WORDS)}'?",
    lambda r: f"What is the last letter of '{r.choice(WORDS)}'?",
    lambda r: f"What is the opposite of '{r.choice(ADJECTIVES)}'?",
]


# The system turn of every prompt (teacher, student, training and evaluation alike). SmolLM2's template would
# otherwise insert its own 20-token default; this one is shorter and makes the teacher's answers short.
SYSTEM = "Reply with one word or number only."


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
