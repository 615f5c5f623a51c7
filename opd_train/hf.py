"""HF model directories: ``config.json`` and the tokenizer's token -> id mapping, with the one teacher/student check.

OPD compares the student's and the teacher's log-probs of the SAME token ids, so what must match is the tokenizer
(its token -> id mapping, added/special tokens included), not the embedding size: Qwen models up to 7B have
151936 embedding rows and 14B and up 152064, padding beyond the same 151665 tokenizer ids. A teacher with a larger
(padded) embedding is accepted; its columns beyond the student's vocabulary are never a token and are ignored.
"""
from __future__ import annotations

import json
import os


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a HuggingFace model directory")
    with open(path) as f:
        return json.load(f)


def approx_params(config: dict) -> int:
    """Parameters of a decoder-only HF config (embedding, untied head, attention with its KV heads, gated MLP);
    norms and biases left out: a size class, not an exact count."""
    d, layers = int(config.get("hidden_size", 0)), int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1) or 1)
    head_dim = int(config.get("head_dim") or d // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    ffn = int(config.get("intermediate_size") or 4 * d)
    vocab = int(config.get("vocab_size", 0))
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
    embeddings = vocab * d * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (attention + 3 * d * ffn)


def tokenizer_mapping(directory: str | None) -> dict[str, int] | None:
    """token -> id of the directory's ``tokenizer.json`` (model vocabulary plus added tokens), None without one."""
    path = os.path.join(directory, "tokenizer.json") if directory else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, list):                  # Unigram: [[piece, score], ...], the id is the position
        mapping = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        mapping = dict(vocab or {})
    mapping.update({t["content"]: int(t["id"]) for t in data.get("added_tokens", [])})
    return mapping


def teacher_mismatch(student_dir: str, student_vocab: int, teacher_dir: str, teacher_vocab: int | None) -> str | None:
    """Why this teacher cannot score this student's tokens (None: it can). ``*_vocab``: embedding rows."""
    ours, theirs = tokenizer_mapping(student_dir), tokenizer_mapping(teacher_dir)
    if ours is not None and theirs is not None:
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
            return (f"the teacher's tokenizer ({teacher_dir}) maps tokens differently from the student's "
                    f"({student_dir}), e.g. {differing}; OPD compares the same token ids, so both need one tokenizer")
        if teacher_vocab is not None and teacher_vocab < student_vocab:
            return (f"the teacher has {teacher_vocab} vocabulary rows but the student {student_vocab}: the teacher "
                    "cannot score every student token id")
        return None
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        missing = teacher_dir if theirs is None else student_dir
        return (f"the teacher's vocab_size ({teacher_vocab}, {teacher_dir}) differs from the student's "
                f"({student_vocab}, {student_dir}) and {missing} has no tokenizer.json to show that the ids mean the "
                "same tokens (a padded embedding is fine when both tokenizers are present and equal)")
    return None
