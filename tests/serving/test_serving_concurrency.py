"""64 concurrent scoring requests: all succeed, each with its own scores (no cross-talk inside a batch)."""
from __future__ import annotations

import asyncio
import random

import aiohttp
from serving_helpers import hf_logprobs


async def _fire(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as session:
        async def one(body):
            async with session.post(url + "/generate", json=body) as resp:
                return resp.status, await resp.json()
        return await asyncio.gather(*(one(b) for b in bodies))


def test_64_concurrent_scoring_requests_no_cross_talk(engine, hf_v1):
    rng = random.Random(0)
    seqs = [[rng.randrange(1000) for _ in range(rng.randrange(2, 30))] for _ in range(64)]
    starts = [rng.randrange(len(s)) for s in seqs]
    bodies = [{"input_ids": s, "return_logprob": True, "logprob_start_len": k, "top_logprobs_num": 3,
               "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}} for s, k in zip(seqs, starts)]
    batches_before = engine.state.scheduler.stats.batches
    replies = asyncio.run(_fire(engine.url, bodies))
    assert all(status == 200 for status, _ in replies)
    for seq, start, (_, body) in zip(seqs, starts, replies):
        meta = body["meta_info"]
        assert meta["prompt_tokens"] == len(seq)
        entries = meta["input_token_logprobs"]
        assert len(entries) == len(seq) - start and entries[0][0] is None
        ref = hf_logprobs(hf_v1, seq)
        for j in range(1, len(entries)):
            pos = start + j
            assert entries[j][1] == seq[pos]
            assert abs(entries[j][0] - ref[pos - 1, seq[pos]].item()) <= 1e-5
            assert [t[1] for t in meta["input_top_logprobs"][j]] == ref[pos - 1].topk(3).indices.tolist()
    batches = engine.state.scheduler.stats.batches - batches_before
    assert batches < 64, "concurrent requests were not batched together"


def test_concurrent_generation_and_scoring_mix(engine, hf_v1):
    """Greedy generations and scoring requests in flight together each get their own answer."""
    prompts = [[101, 7, 333], [45, 812, 9, 300], [5, 6], [17, 250, 3, 999, 42]]
    gen = [{"input_ids": p, "return_logprob": True, "sampling_params": {"max_new_tokens": 5 + i, "temperature": 0}}
           for i, p in enumerate(prompts)]
    score = [{"input_ids": p, "return_logprob": True, "logprob_start_len": 0,
              "sampling_params": {"max_new_tokens": 0}} for p in prompts]
    replies = asyncio.run(_fire(engine.url, [b for pair in zip(gen, score) for b in pair]))
    for i, p in enumerate(prompts):
        (s1, g), (s2, sc) = replies[2 * i], replies[2 * i + 1]
        assert s1 == s2 == 200
        assert g["output_ids"] == [p[-1]] * (5 + i)          # this model repeats the last prompt token greedily
        ref = hf_logprobs(hf_v1, p)
        got = [e[0] for e in sc["meta_info"]["input_token_logprobs"][1:]]
        assert max(abs(a - ref[j, p[j + 1]].item()) for j, a in enumerate(got)) <= 1e-5


def test_shared_prompt_prefix_is_computed_once_and_scores_stay_exact(engine, hf_v1):
    """OPD teacher pattern: n samples per prompt scored with logprob_start_len = prompt_len - 1 in one batch."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1000) for _ in range(12 + i)] for i in range(4)]
    seqs, starts = [], []
    for p in prompts:
        for j in range(4):
            seqs.append(p + [rng.randrange(1000) for _ in range(2 + j)])
            starts.append(len(p) - 1)
    body = {"input_ids": seqs, "return_logprob": True, "logprob_start_len": starts, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 0}}
    import json
    import urllib.request
    req = urllib.request.Request(engine.url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        replies = json.loads(resp.read())
    for seq, start, item in zip(seqs, starts, replies):
        meta = item["meta_info"]
        assert meta["cached_tokens"] == start                      # the prompt's KV was computed once per prompt
        ref = hf_logprobs(hf_v1, seq)
        entries = meta["input_token_logprobs"]
        assert len(entries) == len(seq) - start and entries[0][0] is None
        for j in range(1, len(entries)):
            assert abs(entries[j][0] - ref[start + j - 1, seq[start + j]].item()) <= 1e-5
            assert [t[1] for t in meta["input_top_logprobs"][j]] == ref[start + j - 1].topk(2).indices.tolist()
        last = meta["output_top_logprobs"][0]                       # SGLang's extra next-token entry
        assert [t[1] for t in last] == ref[-1].topk(2).indices.tolist()
        assert abs(last[0][0] - ref[-1].max().item()) <= 1e-5
