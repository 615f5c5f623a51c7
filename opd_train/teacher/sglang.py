"""`SGLangTeacher`: teacher log-probs from an SGLang ``/generate`` endpoint (real SGLang or our CPU engine).

Request per sample (SPEC §3): ``input_ids = prompt + response``, ``max_new_tokens 0``, ``return_logprob``,
``logprob_start_len = prompt_len - 1`` (exactly response_len + 1 entries back, and the shared prompt prefix stays in
SGLang's radix cache), plus ``top_logprobs_num = K`` when the teacher's top-k / full distribution is wanted.

Robustness: one shared aiohttp session per process with a concurrency limit, a timeout per attempt, retries with
exponential backoff on connection errors / 5xx / timeouts / malformed or misaligned bodies (:mod:`opd_train.http`),
ids validated before sending (SGLang 0.5.23 dies on negative or oversized ids), the length checks of
:mod:`.wire` (the response span must be exactly response_len entries after the null), and the echoed ids must be
ours (except SGLang's ``vocab_size - 1 -> 0`` echo quirk): a response for another sequence is never accepted. The
final error names the URL.

Temperature (SPEC §1): SGLang returns prompt log-probs at T=1 whatever the request says. With ``temperature != 1``
this client needs the full distribution (``top_logprobs_num == vocab_size``) and rescales it exactly to T
(``log_softmax(logp_1 / T)``); anything else is refused at construction (the driver's OPD plan asks for the full
distribution whenever the rollout temperature is not 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from ..http import AsyncHTTP, Coalescer, InvalidResponse, RetryPolicy, validate_ids
from ..types import TEACHER_CONCURRENCY, TEACHER_MAX_RETRIES, TEACHER_TIMEOUT
from .base import Teacher, TeacherScores
from .wire import response_logprobs_from_sglang, response_topk_from_sglang


def generate_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/generate`` -> the ``/generate`` URL (slime's rm_url form)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"teacher URL {url!r} must look like http://HOST:PORT/generate (--rm-url)")
    path = parts.path.rstrip("/")
    if path in ("", "/"):
        path = "/generate"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def server_url(url: str) -> str:
    """The teacher server's root (``/health``, ``/get_model_info`` live there): :func:`generate_url` less
    ``/generate``."""
    return generate_url(url).removesuffix("/generate")


@dataclass(frozen=True)
class SGLangTeacherConfig:
    url: str                              # --rm-url, e.g. http://127.0.0.1:30000/generate
    vocab_size: int | None = None         # ids are checked against it before sending (strongly recommended)
    top_logprobs_num: int = 0             # 0: sampled-token log-probs only; K: also the top-K; vocab_size: full
    temperature: float = 1.0              # the student's rollout temperature
    timeout: float = TEACHER_TIMEOUT
    max_retries: int = TEACHER_MAX_RETRIES
    backoff: float = 0.5
    backoff_max: float = 10.0
    concurrency: int = TEACHER_CONCURRENCY
    coalesce_ms: float = 2.0              # per-sample requests arriving within this window go out as one batch
    max_batch: int = 256                  # ... of at most this many sequences (0 ms = one request per sample)

    @property
    def full_distribution(self) -> bool:
        return self.vocab_size is not None and self.top_logprobs_num == self.vocab_size

    def validate(self) -> "SGLangTeacherConfig":
        generate_url(self.url)
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.top_logprobs_num < 0 or (self.vocab_size and self.top_logprobs_num > self.vocab_size):
            raise ValueError(f"teacher top_logprobs_num={self.top_logprobs_num} must be in [0, vocab_size]")
        if self.coalesce_ms < 0 or self.max_batch < 1:
            raise ValueError(f"coalesce_ms must be >= 0 and max_batch >= 1, got {self.coalesce_ms}, {self.max_batch}")
        if not self.temperature > 0:
            raise ValueError(f"rollout temperature must be > 0 for OPD, got {self.temperature}")
        if self.temperature != 1.0 and not self.full_distribution:
            raise ValueError(
                f"rollout temperature is {self.temperature} but SGLang returns teacher log-probs at T=1 (it ignores "
                f"the temperature for prompt log-probs), so the KL would compare a T-scaled student with a T=1 "
                f"teacher. Request the teacher's full distribution (top_logprobs_num = vocab_size = "
                f"{self.vocab_size}; it is rescaled exactly to T), or roll out at temperature 1.")
        return self


class SGLangTeacher(Teacher):
    def __init__(self, config: SGLangTeacherConfig, http: AsyncHTTP | None = None):
        self.config = config.validate()
        self.url = generate_url(config.url)
        policy = RetryPolicy(timeout=config.timeout, max_retries=config.max_retries, backoff=config.backoff,
                             backoff_max=config.backoff_max)
        self.http = http or AsyncHTTP(concurrency=config.concurrency, policy=policy)
        self.out_temperature = config.temperature if config.full_distribution else 1.0
        self._coalescer = Coalescer(self.http, self._send_batch, window_ms=config.coalesce_ms,
                                    max_size=config.max_batch)

    # ------------------------------------------------------------------------------------------------ requests
    def _item(self, tokens: list[int], response_len: int) -> tuple[list[int], int]:
        prompt_len = len(tokens) - response_len
        if response_len < 0 or prompt_len < 1:
            raise ValueError(f"cannot score {response_len} response tokens of a {len(tokens)}-token sequence: the "
                             f"prompt needs at least one token")
        validate_ids([tokens], self.config.vocab_size, what="tokens")
        return list(tokens), prompt_len - 1

    def _payload(self, input_ids: Any, start: Any) -> dict:
        payload = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                   "return_logprob": True, "logprob_start_len": start}
        if self.config.top_logprobs_num:
            payload["top_logprobs_num"] = self.config.top_logprobs_num
        return payload

    async def ascore(self, tokens: list[int], response_len: int) -> TeacherScores:
        """One sample. Concurrent calls are coalesced into batched requests (``coalesce_ms``): HTTP costs ~1-2 ms
        per request on a busy 2-core box, which for 256 samples per step would exceed the teacher's forward."""
        if response_len == 0:
            return self._empty()
        ids, start = self._item(tokens, response_len)
        if self.config.coalesce_ms <= 0:
            return await self.http.post_json(self.url, self._payload(ids, start),
                                             lambda body: self._parse_all([_one(body)], [(ids, response_len)])[0])
        return await self._coalescer.submit(None, (ids, start, response_len))

    async def _send_batch(self, _key: Any, batch: list) -> list[TeacherScores]:
        """Coalesced per-sample requests as one request (a lone sample keeps SGLang's single-request form)."""
        if len(batch) == 1:
            ids, start, _ = batch[0]
            payload = self._payload(ids, start)
        else:
            payload = self._payload([ids for ids, _, _ in batch], [start for _, start, _ in batch])

        def parse(body: Any) -> list[TeacherScores]:
            if len(batch) == 1:
                body = [_one(body)]
            if not isinstance(body, list) or len(body) != len(batch):
                raise InvalidResponse(f"expected a list of {len(batch)} results, got "
                                      f"{len(body) if isinstance(body, list) else type(body).__name__}")
            return self._parse_all(body, [(ids, r) for ids, _, r in batch])

        return await self.http.request_in_loop(self.url, payload, parse)

    def score_samples(self, samples: list) -> None:
        """Synchronous batched scoring of ``Sample`` objects (fills their teacher fields)."""
        results = self.http.run_on_loop(self.ascore_many([(s.tokens, s.response_length) for s in samples])).result()
        for sample, scores in zip(samples, results):
            scores.attach(sample)

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------------------------------------ parsing
    def _empty(self) -> TeacherScores:
        k = self.config.top_logprobs_num
        return TeacherScores(logprobs=torch.zeros(0), temperature=self.out_temperature,
                             topk_ids=torch.zeros(0, k, dtype=torch.long) if k else None,
                             topk_logprobs=torch.zeros(0, k) if k else None)

    def _parse_all(self, items: list, requests: list[tuple[list[int], int]]) -> list[TeacherScores]:
        """The scores of a batch's result objects (``requests``: each one's ids and response length)."""
        scores = [self._parse(item, ids, r) for item, (ids, r) in zip(items, requests)]
        if self.config.top_logprobs_num and self.config.full_distribution and self.config.temperature != 1.0:
            _rescale(scores, [ids[len(ids) - r:] for ids, r in requests], self.config.temperature)
        return scores

    def _parse(self, item: Any, ids: list[int], response_len: int) -> TeacherScores:
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise InvalidResponse(f"no meta_info in the response: {str(item)[:200]}")
        prompt_len, start = len(ids) - response_len, len(ids) - response_len - 1
        span = dict(prompt_len=prompt_len, response_len=response_len, logprob_start_len=start)
        entries = meta.get("input_token_logprobs")
        try:
            logprobs = response_logprobs_from_sglang(entries, **span)
        except (TypeError, ValueError) as exc:
            raise InvalidResponse(str(exc)) from exc
        self._check_echo(entries, ids[start:])
        scores = TeacherScores(logprobs=logprobs, temperature=self.out_temperature)
        k = self.config.top_logprobs_num
        if k:
            try:
                top_ids, top_lps = response_topk_from_sglang(meta.get("input_top_logprobs"), **span)
            except (TypeError, ValueError) as exc:
                raise InvalidResponse(str(exc)) from exc
            if top_ids.shape[1] != k:
                raise InvalidResponse(f"asked for top_logprobs_num={k}, got {top_ids.shape[1]} per position")
            scores.topk_ids, scores.topk_logprobs = top_ids, top_lps
        return scores

    def _check_echo(self, entries: list, expected: list[int]) -> None:
        vocab = self.config.vocab_size
        for j, (entry, ours) in enumerate(zip(entries, expected)):
            echoed = entry[1] if isinstance(entry, list) and len(entry) > 1 else None
            quirk = echoed == 0 and (vocab is None or ours == vocab - 1)   # SGLang echoes vocab_size-1 as 0
            if echoed != ours and not quirk:
                raise InvalidResponse(f"the server echoed token id {echoed!r} at span position {j} where the request "
                                      f"had {ours}: this response belongs to another sequence")


def _rescale(scores: list[TeacherScores], responses: list[list[int]], temperature: float) -> None:
    """Full distributions at T=1 -> exactly at T: log_softmax(logp_1 / T) (the lse of the logits cancels). All
    samples of a batch in one [sum R, V] pass: per-sample tensor ops cost more than the arithmetic here."""
    top_ids = torch.cat([s.topk_ids for s in scores])                                          # [N, V]
    sorted_ids, order = top_ids.sort(dim=1)
    if not bool((sorted_ids == torch.arange(order.shape[1])).all()):
        raise InvalidResponse("the full-distribution top-k does not list every token id exactly once")
    full = torch.cat([s.topk_logprobs for s in scores]).gather(1, order).double() / temperature  # column = id
    full = torch.log_softmax(full, dim=1).float()
    tokens = torch.tensor([t for response in responses for t in response], dtype=torch.long)
    lengths = [len(r) for r in responses]
    logprobs = full[torch.arange(len(tokens)), tokens].split(lengths)
    topk_logprobs = full.gather(1, top_ids).split(lengths)
    for s, lp, top in zip(scores, logprobs, topk_logprobs):
        s.logprobs, s.topk_logprobs = lp, top


def _one(body: Any) -> Any:
    if isinstance(body, list):
        if len(body) != 1:
            raise InvalidResponse(f"expected one result object, got a list of {len(body)}")
        return body[0]
    return body
