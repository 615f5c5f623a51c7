"""Held-out measures of the prune-and-heal experiment, in plain PyTorch on the HF directories (no Ray, no server).

For each held-out prompt (chat template applied and the answer's start pre-filled, as in training):

- ``kl``: the mean per-token reverse KL(student || teacher), exact over the vocabulary, on the student's own
  samples (T = 1, seeded, several per prompt): what OPD minimises, measured where the student goes;
- ``kl_teacher_text``: the same on the teacher's greedy continuations, teacher-forced. A student cannot lower it by
  answering differently (say, in one token): it measures how close its distribution is where the teacher goes;
- ``agreement``: the share of prompts whose greedy answer equals the teacher's greedy answer, token for token up
  to and including the end-of-turn token (both cut at the same length limit); with ``first_token_agreement`` and
  ``common_prefix`` (leading tokens equal to the teacher's) as finer views.

Each KL is a mean over the response tokens up to and including the end-of-turn token, reported with its standard
error over answers (the answer, not the token, is the independent unit).
"""
from __future__ import annotations

import torch

from ..rollout.data import chat_text
from .smollm2_prompts import Question, messages


def encode_prompts(tokenizer, prompts: list[Question]) -> list[list[int]]:
    """Token ids of each prompt exactly as the driver reads the training prompts (``rollout.data``): the chat
    template over the system and user turns, the assistant's answer start pre-filled."""
    return [tokenizer(chat_text(tokenizer, messages(p)), add_special_tokens=False)["input_ids"] for p in prompts]


def _left_padded(prompts: list[list[int]], pad_id: int):
    """ids, attention mask and positions of a left-padded batch (positions count the real tokens only)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def _decode(models, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, pick,
            repeats: int = 1) -> list[list[int]]:
    """Answers (up to and including the first end token) of ``repeats`` continuations per prompt (adjacent), the
    models decoding the same tokens in lockstep, each with its KV cache. ``pick(rows, alive)`` chooses the next
    token of the answers still going (``alive``: their indices) from each model's last logits. Each prompt is
    prefilled once and its cache shared by its repeats (prompts are ~3x longer than answers), and finished answers
    leave the batch (most end within a few tokens)."""
    ids, mask, pos = _left_padded(prompts, pad_id)
    caches, rows = [], []
    for model in models:
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        if repeats > 1:
            res.past_key_values.batch_repeat_interleave(repeats)
        caches.append(res.past_key_values)
        rows.append(res.logits[:, -1].float().repeat_interleave(repeats, 0))
    mask, pos = mask.repeat_interleave(repeats, 0), pos[:, -1:].repeat_interleave(repeats, 0)
    alive = torch.arange(len(mask))
    answers: list[list[int]] = [[] for _ in range(len(mask))]
    eos = torch.tensor(sorted(eos_ids))
    for step in range(max_new_tokens):
        token = pick(rows, alive)
        for i, t in zip(alive.tolist(), token.tolist()):
            answers[i].append(t)
        going = ~torch.isin(token, eos)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero()[:, 0]
            for cache in caches:
                cache.batch_select_indices(keep)
            alive, token, mask, pos = alive[keep], token[keep], mask[keep], pos[keep]
        mask, pos = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], 1), pos + 1
        rows = [model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1).logits[:, -1].float() for model, cache in zip(models, caches)]
    return answers


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, *,
             greedy: bool, seed: int = 0, batch: int = 16) -> list[list[int]]:
    """Continuations (up to and including the first end token) of each prompt, greedy or sampled at T = 1."""
    generator = torch.Generator().manual_seed(seed)

    def pick(rows, alive):
        if greedy:
            return rows[0].argmax(-1)
        return torch.multinomial(torch.softmax(rows[0], -1), 1, generator=generator)[:, 0]
    return [answer for start in range(0, len(prompts), batch)
            for answer in _decode((model,), prompts[start:start + batch], max_new_tokens, eos_ids, pad_id, pick)]


def sampled_kl(student, teacher, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, *,
               samples: int = 1, seed: int = 0, batch: int = 48) -> tuple[list[list[int]], list[tuple[float, int]]]:
    """``samples`` answers per prompt sampled from the student (T = 1, seeded; a prompt's answers are adjacent) and
    per answer (sum over its tokens of KL(student || teacher), token count), up to and including the end token.

    Both models decode the sampled tokens in lockstep (:func:`_decode`), so each step's KL is read from the two
    rows at hand: no teacher-forced pass over prompt + answer afterwards. A padded teacher vocabulary is read over
    the student's columns."""
    answers, kls = [], []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        kl = torch.zeros(len(chunk) * samples, dtype=torch.float64)

        def pick(rows, alive, kl=kl):
            ls = torch.log_softmax(rows[0], -1)
            lt = torch.log_softmax(rows[1][:, :ls.shape[-1]], -1)
            kl[alive] += (ls.exp() * (ls - lt)).sum(-1).double()
            return torch.multinomial(ls.exp(), 1, generator=generator)[:, 0]
        got = _decode((student, teacher), chunk, max_new_tokens, eos_ids, pad_id, pick, repeats=samples)
        answers += got
        kls += [(value, len(answer)) for value, answer in zip(kl.tolist(), got)]
    return answers, kls


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


def response_kls(student, teacher, prompts: list[list[int]], responses: list[list[int]], *,
                 teacher_logprobs: list | None = None, batch: int = 16) -> list[tuple[float, int]]:
    """Per response, (sum over its tokens of KL(student || teacher) at T = 1, its token count), teacher-forced (a
    padded teacher vocabulary is read over the student's columns). ``teacher_logprobs``: the teacher's rows of the
    same responses from :func:`response_logprobs`, when they were computed once for several students."""
    ls_batches = response_logprobs(student, prompts, responses, batch)
    vocab = ls_batches[0].shape[-1] if ls_batches else None
    lt_batches = teacher_logprobs or response_logprobs(teacher, prompts, responses, batch, columns=vocab)
    if [lt.shape for lt in lt_batches] != [ls.shape for ls in ls_batches]:
        raise ValueError("teacher_logprobs do not match these responses and this student's vocabulary (compute them "
                         "with response_logprobs(teacher, prompts, responses, batch, columns=student vocabulary))")
    rows = iter(torch.cat([(ls.exp() * (ls - lt)).sum(-1) for ls, lt in zip(ls_batches, lt_batches)]).tolist()
                if ls_batches else [])
    return [(sum(next(rows) for _ in r), len(r)) for r in responses]     # rows come in response order (_chunks)


def mean_and_se(per_response: list[tuple[float, int]]) -> tuple[float, float]:
    """The per-token mean (sum of KLs / tokens) and its standard error over responses (ratio estimator: a response
    is the independent unit, its tokens are not)."""
    total, tokens, n = sum(k for k, _ in per_response), sum(t for _, t in per_response), len(per_response)
    mean = total / max(tokens, 1)
    if n < 2 or tokens == 0:
        return mean, float("nan")
    spread = sum((k - mean * t) ** 2 for k, t in per_response) / (n - 1)
    return mean, (spread / n) ** 0.5 / (tokens / n)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def evaluate(student, teacher, tokenizer, prompts: list[list[int]], teacher_text: list[list[int]],
             teacher_answers: list[str], max_new_tokens: int, eos_ids: set[int], seed: int = 0,
             teacher_text_logprobs: list | None = None, samples: int = 1) -> dict:
    """kl (over ``samples`` sampled answers per prompt), kl_teacher_text, agreement (module docstring), each KL with
    its standard error over answers (``kl_se``, ``kl_teacher_text_se``), plus two finer views of agreement on the
    same greedy answers: ``first_token_agreement`` (the answer starts with the teacher's token) and
    ``common_prefix`` (mean number of leading tokens equal to the teacher's). ``teacher_text_logprobs``:
    :func:`response_logprobs` of the teacher on ``teacher_text``, computed once for every student measured."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    # greedy generation in one batch of 48: a decode step's matmuls are small, so larger batches run faster on CPU
    # (12 s -> 8 s for 48 prompts, measured with another job running); the teacher-forced KL keeps batches of 16
    _, own = sampled_kl(student, teacher, prompts, max_new_tokens, eos_ids, pad, samples=samples, seed=seed)
    greedy = generate(student, prompts, max_new_tokens, eos_ids, pad, greedy=True, batch=48)
    answers = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in greedy]
    n = max(len(prompts), 1)
    kl, kl_se = mean_and_se(own)
    text, text_se = mean_and_se(response_kls(student, teacher, prompts, teacher_text,
                                             teacher_logprobs=teacher_text_logprobs))
    return {"kl": kl, "kl_se": kl_se, "kl_teacher_text": text, "kl_teacher_text_se": text_se,
            "agreement": sum(g == t for g, t in zip(greedy, teacher_text)) / n,
            "first_token_agreement": sum(g[:1] == t[:1] for g, t in zip(greedy, teacher_text)) / n,
            "common_prefix": sum(_common_prefix(g, t) for g, t in zip(greedy, teacher_text)) / n,
            "examples": [{"student": a, "teacher": b} for a, b in list(zip(answers, teacher_answers))[:4]]}
