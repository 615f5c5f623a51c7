"""Prompts of the prune-and-heal experiment, generated locally (no dataset download), with a held-out split.

Short questions whose answer the teacher gives in a few tokens and then ends its turn: sums, capitals, first and
last letters, opposites; the start of the answer is pre-filled in the assistant's turn. A question is held out by a
fixed hash of its text (~20%), so the split does not depend on the order or on the number of prompts drawn.
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
# Each family's prompt pre-fills the start of the answer in the teacher's own words (probed without it: "29 + 14 =
# 31", "The capital of Spain is Madrid.", "The first letter of 'big' is 'B'.", "The opposite of 'hot' is
# 'cold'."), so the response is the content itself ("Madrid.", "B'.") ending with the end-of-turn token. Without
# the pre-fill the response repeats the question first and agreement mostly measured that restatement and the
# quote style: in a plain-PyTorch probe (the student without layers 21-23, 18 exact-KL steps) agreement went 0% ->
# 6% without it, 6% -> 23% with it. Whether the teacher is right does not matter: the student learns the teacher
# ("The last letter of 'doctor' is 'D'."). Families that the teacher answers at length (times, minus, colours,
# rhymes, the next weekday) are out, and so are animals' legs, whose answers vary in form ("A cow has five legs.",
# "The answer is 1.").
Question = tuple[str, str]          # (the user's question, the start of the assistant's answer)


def _sum(r: random.Random) -> Question:
    a, b = r.randint(2, 40), r.randint(2, 40)
    return f"What is {a} plus {b}?", f"{a} + {b} ="


def _capital(r: random.Random) -> Question:
    country = r.choice(list(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is"


def _letter(which: str):
    def template(r: random.Random) -> Question:
        word = r.choice(WORDS)
        return f"What is the {which} letter of '{word}'?", f"The {which} letter of '{word}' is '"
    return template


def _opposite(r: random.Random) -> Question:
    word = r.choice(ADJECTIVES)
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '"


TEMPLATES = [_sum, _capital, _letter("first"), _letter("last"), _opposite]

# The system turn of every prompt (teacher, student, training and evaluation alike). SmolLM2's template would
# otherwise insert its own 20-token default; this one is shorter and makes the teacher's answers short.
SYSTEM = "Reply with one word or number only."


def messages(question: Question) -> list[dict]:
    """System and user turns, and the assistant's pre-filled answer start (continued by the model)."""
    user, answer_start = question
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer_start}]


def held_out(question: Question) -> bool:
    return hashlib.sha256(question[0].encode()).digest()[0] < 52          # ~20%


def sample_prompts(n: int, *, held: bool, seed: int) -> list[Question]:
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


def write_prompt_file(path: str, prompts: list[Question]) -> str:
    """JSONL with a chat ``messages`` field (``--input-key messages --apply-chat-template``), the answer pre-filled."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"messages": messages(p)}) + "\n")
    return path
