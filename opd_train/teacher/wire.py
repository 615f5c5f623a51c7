r"""Cut SGLang prompt log-probs down to exactly the response span (SGLang 0.5.23 ``/generate`` scoring).

A scoring request sends the whole sample (prompt ids P + response ids R, total L = P + R) with
``max_new_tokens=0, return_logprob=true, logprob_start_len=K``. SGLang answers ``meta_info.input_token_logprobs``,
a list of ``L - K`` triples ``[logprob, token_id, text]``: entry j is ``log p(ids[K+j] | ids[:K+j])`` and the FIRST
entry's logprob is always null (token K's own log-prob needs ``K-1``). Response token r sits at position P + r, i.e.

    entry index j = P + r - K,   r = 0 .. R-1   ->   the slice [P - K, P - K + R)   (needs K <= P - 1)

``K = P - 1`` (the recommended setting: it keeps the shared prompt in the radix cache) gives R + 1 entries and the
slice [1, R + 1); ``K = 0`` gives L entries. With ``top_logprobs_num = k`` the parallel list
``meta_info.input_top_logprobs`` holds, per position, k triples sorted by logprob (entry 0 is a plain null).

Only the logprob slot is read: SGLang echoes id ``vocab_size - 1`` as 0 in the id slot (fixture README, quirk 2), so
the caller's own ids are the truth. Every length is checked, because a one-off shift silently pairs each student
log-prob with the teacher's score of the neighbouring token, and training still "works".
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _span(num_entries: int, *, prompt_len: int, response_len: int, logprob_start_len: int,
          field: str) -> slice:
    """The slice of the entry list that covers the response tokens, after checking every length."""
    for name, v in (("prompt_len", prompt_len), ("response_len", response_len),
                    ("logprob_start_len", logprob_start_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if prompt_len < 1 or response_len < 0:
        raise ValueError(f"need prompt_len >= 1 and response_len >= 0; got {prompt_len}, {response_len}")
    if not 0 <= logprob_start_len <= prompt_len - 1:
        raise ValueError(f"logprob_start_len={logprob_start_len} must be in [0, prompt_len - 1 = {prompt_len - 1}]: "
                         "SGLang returns no log-prob for the token at logprob_start_len itself, so K >= prompt_len "
                         "loses the first response token; request logprob_start_len = prompt_len - 1")
    expected = prompt_len + response_len - logprob_start_len
    if num_entries != expected:
        raise ValueError(f"SGLang returned {num_entries} {field} entries but prompt_len={prompt_len} + "
                         f"response_len={response_len} - logprob_start_len={logprob_start_len} = {expected} were "
                         "expected; the request's input_ids or logprob_start_len do not match this sample")
    start = prompt_len - logprob_start_len
    return slice(start, start + response_len)


def _logprob_of(entry: Any, where: str) -> float:
    """The float logprob of one ``[logprob, id, text]`` triple; errors name the position."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 1:
        raise ValueError(f"{where}: expected a [logprob, token_id, text] triple, got {entry!r}")
    value = entry[0]
    if value is None:
        raise ValueError(f"{where}: logprob is null inside the response span; SGLang gives null only for the entry "
                         "at logprob_start_len, so the span is shifted (check logprob_start_len)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: logprob must be a number, got {value!r}")
    return float(value)


def response_logprobs_from_sglang(input_token_logprobs: Sequence[Any], *, prompt_len: int, response_len: int,
                                  logprob_start_len: int) -> torch.Tensor:
    """Teacher log-probs of exactly the response tokens from ``meta_info.input_token_logprobs``.

    Args:
        input_token_logprobs: SGLang's list of ``[logprob, token_id, text]`` (first logprob null).
        prompt_len: P, number of prompt ids sent; response_len: R, number of response ids sent after them.
        logprob_start_len: K as sent in the request (0 <= K <= P - 1; P - 1 recommended).

    Returns:
        [R] float32 tensor, entry r = log p_T(response[r] | prompt, response[:r]).

    Raises:
        ValueError: a K outside [0, P-1], a list length other than P + R - K, or a null / non-number inside
            the span (the message names the response position).
    """
    if not isinstance(input_token_logprobs, (list, tuple)):
        raise TypeError(f"input_token_logprobs must be a list of triples; got {type(input_token_logprobs).__name__}")
    span = _span(len(input_token_logprobs), prompt_len=prompt_len, response_len=response_len,
                 logprob_start_len=logprob_start_len, field="input_token_logprobs")
    entries = input_token_logprobs[span]
    fast = _fast_slots(entries)
    values = fast[0] if fast is not None else [     # something is off: the per-entry checks name it
        _logprob_of(e, f"response token {r} (input_token_logprobs[{span.start + r}])") for r, e in enumerate(entries)]
    return _tensor(values, np.float32)


def response_topk_from_sglang(input_top_logprobs: Sequence[Any], *, prompt_len: int, response_len: int,
                              logprob_start_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k over the response span from ``meta_info.input_top_logprobs`` (``top_logprobs_num = k``).

    Args:
        input_top_logprobs: SGLang's list (entry 0 null) of per-position lists of k ``[logprob, token_id, text]``.
        prompt_len, response_len, logprob_start_len: as for :func:`response_logprobs_from_sglang`.

    Returns:
        (ids [R, k] int64, logprobs [R, k] float32): row r is the teacher's top-k for the position that predicts
        response token r. The ids here are the teacher's top-k choices (not an echo of the input), so they are
        read as given. Feed them to ``opd.topk_reverse_kl`` or ``opd.topk_to_dense_logprobs``.

    Raises:
        ValueError: the length checks of :func:`response_logprobs_from_sglang`, a null row inside the span, or rows
            with different k.
    """
    if not isinstance(input_top_logprobs, (list, tuple)):
        raise TypeError(f"input_top_logprobs must be a list; got {type(input_top_logprobs).__name__}")
    span = _span(len(input_top_logprobs), prompt_len=prompt_len, response_len=response_len,
                 logprob_start_len=logprob_start_len, field="input_top_logprobs")
    rows = input_top_logprobs[span]
    k = len(rows[0]) if rows and isinstance(rows[0], (list, tuple)) else 0
    if k and _types(rows) <= _SEQUENCES and all(len(row) == k for row in rows):
        flat = _fast_slots([e for row in rows for e in row], with_ids=True)
        if flat is not None:
            return (_tensor(flat[1], np.int64).reshape(response_len, k),
                    _tensor(flat[0], np.float32).reshape(response_len, k))
    ids: list[list[int]] = []
    values: list[list[float]] = []
    for r, row in enumerate(rows):
        where = f"response token {r} (input_top_logprobs[{span.start + r}])"
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"{where}: expected a non-empty list of top-k triples, got {row!r} (was "
                             "top_logprobs_num > 0 requested, and is logprob_start_len right?)")
        if ids and len(row) != len(ids[0]):
            raise ValueError(f"{where}: {len(row)} top-k entries but earlier rows have {len(ids[0])}")
        values.append([_logprob_of(e, f"{where}[{k}]") for k, e in enumerate(row)])
        ids.append([_token_id_of(e, f"{where}[{k}]") for k, e in enumerate(row)])
    k = len(ids[0]) if ids else 0
    return (torch.tensor(ids, dtype=torch.int64).reshape(response_len, k),
            torch.tensor(values, dtype=torch.float32).reshape(response_len, k))


def _tensor(values: list, dtype) -> torch.Tensor:
    """A list of Python numbers as a tensor, through NumPy (torch.tensor reads a list ~5x slower)."""
    return torch.from_numpy(np.array(values, dtype=dtype))


_SEQUENCES = {list, tuple}
_NUMBERS = {float, int}


def _types(items: Sequence[Any]) -> set:
    return set(map(type, items))


def _fast_slots(entries: Sequence[Any], with_ids: bool = False) -> tuple[list, list | None] | None:
    """(logprobs, ids) of well-formed triples in a few C-level passes (a step's full distributions hold ~10^5
    entries, and the per-entry checks below cost ~1 us each), or None when any entry is not a list / tuple with a
    real number (never bool or null) in slot 0 and, ``with_ids``, an int id in slot 1: the caller then runs the
    per-entry checks, which name what is wrong."""
    if not _types(entries) <= _SEQUENCES:
        return None
    try:
        values = [e[0] for e in entries]
        ids = [e[1] for e in entries] if with_ids else None
    except IndexError:
        return None
    if not _types(values) <= _NUMBERS or (with_ids and not _types(ids) <= {int}):
        return None
    return values, ids


def _token_id_of(entry: Any, where: str) -> int:
    if len(entry) < 2 or isinstance(entry[1], bool) or not isinstance(entry[1], int):
        raise ValueError(f"{where}: expected an integer token id in slot 1 of {entry!r}")
    return entry[1]
