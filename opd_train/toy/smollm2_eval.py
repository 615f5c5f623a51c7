"""Held-out measures of the prune-and-heal experiment, in plain PyTorch on the HF directories (no Ray, no server).

For each held-out prompt (chat template applied and the answer's start pre-filled, as in training):

- ``kl``: the mean per-token reverse KL(student || teacher), exact over the vocabulary, on the student's own
  samples (T = 1, seeded): what OPD minimises, measured where the student goes;
- ``kl_teacher_text``: the same on the teacher's greedy continuations, teacher-forced. A student cannot lower it by
  answering differently (say, in one token): it measures how close its distribution is where the teacher goes;
- ``agreement``: the share of prompts whose greedy answer equals the teacher's greedy answer, token for token up
  to and including the end-of-turn token (both cut at the same length limit); with ``first_token_agreement`` and
  ``common_prefix`` (leading tokens equal to the teacher's) as finer views.

Each mean counts the response tokens up to and including the end-of-turn token.
"""
from __future__ import annotations

import torch

from ..rollout.data import chat_text
from .smollm2_prompts import Question, messages


def encode_prompts(tokenizer, prompts: list[Question]) -> list[list[int]]:
    """Token ids of each prompt exactly as the driver reads the training prompts (``rollout.data``): the chat
    template over the system and user turns, the assistant's answer start pre-filled."""
    return [tokenizer(chat_text(tokenizer, messages(p)), add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, *,
             greedy: bool, seed: int = 0, batch: int = 16) -> list[list[int]]:
    """Continuations (up to and including the first end token) of each prompt, left-padded batches."""
    out = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        done = torch.zeros(len(chunk), dtype=torch.bool)
        new = []
        past = None
        step_ids = ids
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        step_pos = positions
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                        use_cache=True, logits_to_keep=1)     # the prompt positions' logits are never read
            past = res.past_key_values
            logits = res.logits[:, -1].float()
            if greedy:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new.append(token)
            done |= torch.tensor([int(t) in eos_ids for t in token])
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype)], 1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]
        gen = torch.stack(new, 1).tolist()
        for row in gen:
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row) - 1)
            out.append(row[:cut + 1])
    return out


def _chunks(prompts: list[list[int]], responses: list[list[int]], batch: int):
    """Right-padded batches of (prompt + response) ids, with the positions that predict a response token."""
    pairs = [(p, r) for p, r in zip(prompts, responses) if r]
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)     # positions that predict a response token
        for i, (p, r) in enumerate(chunk):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            scored[i, len(p) - 1:len(p) + len(r) - 1] = True
        yield ids, attention, scored


@torch.no_grad()
def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], batch: int = 16,
                      columns: int | None = None) -> list:
    """Per batch, the log-softmax rows [scored, V] that predict each response token, teacher-forced, over the
    first ``columns`` vocabulary entries (a teacher's padding columns are not tokens: the kernels ignore them too).
    The output layer runs on those rows only (the prompt positions' logits would be most of its cost, unused)."""
    out = []
    for ids, attention, scored in _chunks(prompts, responses, batch):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state[scored]
        logits = model.get_output_embeddings()(hidden)[:, :columns]
        out.append(torch.log_softmax(logits.float(), -1))
    return out


def mean_kl(student, teacher, prompts: list[list[int]], responses: list[list[int]], *,
            teacher_logprobs: list | None = None, batch: int = 16) -> float:
    """Mean per-token KL(student || teacher) at T = 1 over the response tokens, teacher-forced (a padded teacher
    vocabulary is read over the student's columns). ``teacher_logprobs``: the teacher's rows of the same responses
    from :func:`response_logprobs`, when they were computed once for several students."""
    ls_batches = response_logprobs(student, prompts, responses, batch)
    vocab = ls_batches[0].shape[-1] if ls_batches else None
    lt_batches = teacher_logprobs or response_logprobs(teacher, prompts, responses, batch, columns=vocab)
    if [lt.shape for lt in lt_batches] != [ls.shape for ls in ls_batches]:
        raise ValueError("teacher_logprobs do not match these responses and this student's vocabulary (compute them "
                         "with response_logprobs(teacher, prompts, responses, batch, columns=student vocabulary))")
    total = sum(float((ls.exp() * (ls - lt)).sum()) for ls, lt in zip(ls_batches, lt_batches))
    return total / max(sum(len(ls) for ls in ls_batches), 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def evaluate(student, teacher, tokenizer, prompts: list[list[int]], teacher_text: list[list[int]],
             teacher_answers: list[str], max_new_tokens: int, eos_ids: set[int], seed: int = 0,
             teacher_text_logprobs: list | None = None) -> dict:
    """kl, kl_teacher_text, agreement (module docstring), plus two finer views of agreement on the same greedy
    answers: ``first_token_agreement`` (the answer starts with the teacher's token) and ``common_prefix`` (mean
    number of leading tokens equal to the teacher's). ``teacher_text_logprobs``: :func:`response_logprobs` of the
    teacher on ``teacher_text``, computed once for every student measured against it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    # generation in batches of 48: a decode step's matmuls are small, so larger batches run faster on CPU (2 x 12 s
    # -> 2 x 8 s for 48 prompts, measured with another job running); the teacher-forced KL keeps batches of 16
    own = generate(student, prompts, max_new_tokens, eos_ids, pad, greedy=False, seed=seed, batch=48)
    greedy = generate(student, prompts, max_new_tokens, eos_ids, pad, greedy=True, batch=48)
    answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in greedy]
    n = max(len(prompts), 1)
    return {"kl": mean_kl(student, teacher, prompts, own),
            "kl_teacher_text": mean_kl(student, teacher, prompts, teacher_text,
                                       teacher_logprobs=teacher_text_logprobs),
            "agreement": sum(g == t for g, t in zip(greedy, teacher_text)) / n,
            "first_token_agreement": sum(g[:1] == t[:1] for g, t in zip(greedy, teacher_text)) / n,
            "common_prefix": sum(_common_prefix(g, t) for g, t in zip(greedy, teacher_text)) / n,
            "examples": [{"student": a, "teacher": b} for a, b in list(zip(answers, teacher_answers))[:4]]}
