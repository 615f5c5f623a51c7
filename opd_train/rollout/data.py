"""Prompt data: JSONL / Parquet files -> tokenised prompts, served in seeded epochs.

``--input-key`` names the prompt column: a string, or a list of chat messages (``{"role", "content"}``), which
needs ``--apply-chat-template``. ``--label-key`` names the ground truth for task rewards (optional). Everything is
loaded and tokenised up front, before any server or trainer starts, so a wrong key or an empty file fails fast.
The order of prompts is a pure function of the seed and the position, so a resumed run continues exactly where
the checkpoint was taken (:meth:`PromptDataset.batch` takes the rollout step).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prompt:
    text: str                       # after the chat template, when applied
    ids: tuple[int, ...]
    label: str | None = None
    metadata: dict = field(default_factory=dict)


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl (one JSON object per line), .json (a list of objects) or .parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        if path.endswith(".json"):
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json prompt file must hold a list of objects")
            return rows
        rows = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        return rows


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The chat template over ``messages``, the assistant's turn opened for the model to write. A conversation that
    ends with an assistant message is a prefilled answer: the model continues that message (the answer's start,
    say "The capital of France is", is then part of the prompt and never trained on)."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_text(row: dict, key: str, tokenizer, chat: bool, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where}: no column {key!r} (columns: {sorted(row)}); set --input-key")
    value = row[key]
    if isinstance(value, list):
        if not chat:
            raise ValueError(f"{where}: column {key!r} holds chat messages; add --apply-chat-template")
        return chat_text(tokenizer, value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {key!r} must be a string or a list of chat messages")
    if chat:
        return chat_text(tokenizer, [{"role": "user", "content": value}])
    return value


def load_prompts(path: str, tokenizer, *, input_key: str = "prompt", label_key: str | None = "label",
                 apply_chat_template: bool = False, max_prompts: int | None = None,
                 require_labels: bool = False) -> list[Prompt]:
    rows = read_rows(path)
    if max_prompts is not None:
        rows = rows[:max_prompts]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    prompts = []
    for i, row in enumerate(rows):
        where = f"{os.path.basename(path)} row {i}"
        text = _prompt_text(row, input_key, tokenizer, apply_chat_template, where)
        label = row.get(label_key) if label_key else None
        if require_labels and label is None:
            raise ValueError(f"{where}: no label in column {label_key!r}; the task reward needs one (--label-key)")
        ids = tokenizer(text, add_special_tokens=not apply_chat_template)["input_ids"]
        if not ids:
            raise ValueError(f"{where}: the prompt tokenises to nothing")
        meta = {k: v for k, v in row.items() if k not in (input_key, label_key)}
        prompts.append(Prompt(text=text, ids=tuple(ids), label=None if label is None else str(label), metadata=meta))
    return prompts


class PromptDataset:
    """Epochs over the prompts; batch ``k`` is always the same prompts for the same seed (resumable)."""

    def __init__(self, prompts: list[Prompt], *, shuffle: bool, seed: int):
        if not prompts:
            raise ValueError("the prompt dataset is empty")
        self.prompts, self.shuffle, self.seed = prompts, shuffle, seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch(self, step: int, size: int) -> list[Prompt]:
        """Prompts of rollout step ``step`` (0-based), ``size`` of them, wrapping into the next epoch."""
        out, position = [], step * size
        for pos in range(position, position + size):
            epoch, offset = divmod(pos, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[offset]])
        return out


def load_tokenizer(hf_dir: str) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_dir)
