"""Fault injection against the SGLang teacher client: retries are counted, the final error is clear, and a
misaligned answer is never accepted. Plus the concurrency limit, the temperature contract and a real engine."""
from __future__ import annotations

import asyncio
import json
import pathlib
import time

import pytest
import torch

from opd_train.http import RequestFailed
from loopback import LoopbackServer, Reply
from opd_train.teacher import SGLangTeacher, SGLangTeacherConfig, generate_url

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"
CAP = json.loads((FIXTURES / "score_single_start_k.json").read_text())
IDS = CAP["request"]["input_ids"]                   # logprob_start_len 10 -> prompt_len 11, response_len 13
GOOD = Reply(200, CAP["response"])
EXPECTED = torch.tensor([e[0] for e in CAP["response"]["meta_info"]["input_token_logprobs"][1:]])


def teacher(url: str, **kw) -> SGLangTeacher:
    kw = {"vocab_size": 1000, "backoff": 0.01, "max_retries": 3, **kw}
    return SGLangTeacher(SGLangTeacherConfig(url=url, **kw))


def with_entries(entries) -> Reply:
    body = json.loads(json.dumps(CAP["response"]))
    body["meta_info"]["input_token_logprobs"] = entries
    return Reply(200, body)


ENTRIES = CAP["response"]["meta_info"]["input_token_logprobs"]
FAULTS = {
    "dropped connection": Reply(drop=True),
    "HTTP 500": Reply(500, {"error": {"message": "boom"}}),
    "HTTP 503": Reply(503, b"Service Unavailable", content_type="text/plain"),
    "timeout": Reply(200, CAP["response"], delay=1.0),
    "malformed JSON": Reply(200, b'{"output_ids": [], "meta_info": {"input_tok'),
    "one entry short": with_entries(ENTRIES[:-1]),
    "one entry too many": with_entries(ENTRIES + [[-1.0, 5, None]]),
    "null inside the span": with_entries(ENTRIES[:3] + [[None, ENTRIES[3][1], None]] + ENTRIES[4:]),
    "another sequence's echo": with_entries([ENTRIES[0]] + [[e[0], (e[1] + 1) % 999, None] for e in ENTRIES[1:]]),
    "no meta_info": Reply(200, {"output_ids": []}),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_retried_then_succeeds(fault):
    with LoopbackServer(default=GOOD) as srv:
        srv.script(FAULTS[fault], FAULTS[fault])
        t = teacher(srv.url, timeout=0.3)
        scores = asyncio.run(t.ascore(IDS, 13))
        assert torch.equal(scores.logprobs, EXPECTED)
        assert srv.count("/generate") == 3 and t.http.stats.retries == 2
        t.close()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_persistent_fault_gives_a_clear_error(fault):
    with LoopbackServer(default=FAULTS[fault]) as srv:
        t = teacher(srv.url, timeout=0.3, max_retries=2)
        started = time.monotonic()
        with pytest.raises(RequestFailed) as info:
            asyncio.run(t.ascore(IDS, 13))
        assert srv.count("/generate") == 3 and time.monotonic() - started < 10
        t.close()
    message = str(info.value)
    assert f"POST {srv.url}/generate failed after 3 attempt(s)" in message and "last error:" in message
    assert info.value.url == f"{srv.url}/generate" and info.value.attempts == 3


def test_connection_refused_names_the_url():
    from opd_train.rollout.engines.launch import free_port
    url = f"http://127.0.0.1:{free_port()}"
    t = teacher(url, max_retries=1)
    with pytest.raises(RequestFailed, match=rf"POST {url}/generate failed after 2 attempt\(s\).*Is the server"):
        asyncio.run(t.ascore(IDS, 13))
    t.close()


def test_concurrency_limit_and_one_session():
    with LoopbackServer(default=Reply(200, CAP["response"], delay=0.05)) as srv:
        t = teacher(srv.url, concurrency=4, coalesce_ms=0)       # one request per call

        async def many():
            return await asyncio.gather(*(t.ascore(IDS, 13) for _ in range(20)))

        results = asyncio.run(many())
        assert all(torch.equal(r.logprobs, EXPECTED) for r in results)
        assert 2 <= srv.peak_in_flight <= 4
        session = t.http._session
        asyncio.run(t.ascore(IDS, 13))             # a new event loop in the caller: still the same session
        assert t.http._session is session
        t.close()


def test_concurrent_calls_are_coalesced_into_batches():
    with LoopbackServer() as srv:
        def reply(path, body):                  # answer a batch with one copy of the capture per item
            n = len(body["input_ids"]) if isinstance(body["input_ids"][0], list) else 0
            return Reply(200, [CAP["response"]] * n if n else CAP["response"])

        srv.default = reply
        t = teacher(srv.url, coalesce_ms=20, max_batch=8)

        async def many():
            return await asyncio.gather(*(t.ascore(IDS, 13) for _ in range(20)))

        results = asyncio.run(many())
        assert all(torch.equal(r.logprobs, EXPECTED) for r in results)
        sizes = [len(b["input_ids"]) if isinstance(b["input_ids"][0], list) else 1 for _, b in srv.requests]
        assert sum(sizes) == 20 and len(sizes) == 3 and max(sizes) == 8
        assert srv.requests[0][1]["logprob_start_len"] == [10] * 8
        t.close()


def test_empty_response_needs_no_request_and_bad_lengths_are_refused():
    with LoopbackServer(default=GOOD) as srv:
        t = teacher(srv.url)
        empty = asyncio.run(t.ascore([1, 2, 3], 0))
        assert empty.logprobs.shape == (0,) and srv.requests == []
        with pytest.raises(ValueError, match="prompt needs at least one token"):
            asyncio.run(t.ascore([1, 2, 3], 3))
        t.close()


def test_url_forms():
    assert generate_url("http://h:1") == "http://h:1/generate"
    assert generate_url("http://h:1/generate/") == "http://h:1/generate"
    with pytest.raises(ValueError, match="--rm-url"):
        generate_url("h:1/generate")


# ------------------------------------------------------------------------------------------ temperature contract

def test_t_not_1_without_full_distribution_is_refused():
    with pytest.raises(ValueError, match="T=1 teacher"):
        SGLangTeacherConfig(url="http://h:1/generate", vocab_size=1000, temperature=0.7).validate()
    SGLangTeacherConfig(url="http://h:1/generate", vocab_size=1000, temperature=0.7,
                        top_logprobs_num=1000).validate()


@pytest.fixture(scope="module")
def engine_and_hf():
    from transformers import AutoModelForCausalLM

    from opd_train.serving import ServerConfig, start_in_thread
    handle = start_in_thread(ServerConfig(model_path=str(FIXTURES / "model"), port=0, num_threads=1))
    hf = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "model"), dtype=torch.float32).eval()
    yield handle, hf
    handle.stop()


def _hf_lp(hf, ids, temperature=1.0):
    with torch.inference_mode():
        return torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double() / temperature, dim=-1)


def test_real_engine_scores_equal_hf(engine_and_hf):
    handle, hf = engine_and_hf
    t = teacher(handle.url, top_logprobs_num=4)
    items = [(IDS, 13), (IDS[:7], 3), ([5, 900, 31, 444], 2)]
    batched = asyncio.run(t.ascore_many(items))
    for (ids, r), scores in zip(items, batched):
        ref = _hf_lp(hf, ids)
        p = len(ids) - r
        want = torch.tensor([ref[p - 1 + j, ids[p + j]].item() for j in range(r)])
        assert (scores.logprobs - want).abs().max() <= 1e-5
        assert scores.topk_ids.tolist() == [ref[p - 1 + j].topk(4).indices.tolist() for j in range(r)]
        single = asyncio.run(t.ascore(ids, r))
        assert (single.logprobs - scores.logprobs).abs().max() <= 1e-6
    t.close()


def test_full_distribution_is_rescaled_exactly_to_t(engine_and_hf):
    handle, hf = engine_and_hf
    t = teacher(handle.url, top_logprobs_num=1000, temperature=0.7)
    scores = asyncio.run(t.ascore(IDS, 13))
    ref = _hf_lp(hf, IDS, 0.7)
    want = torch.tensor([ref[10 + j, IDS[11 + j]].item() for j in range(13)])
    assert scores.temperature == 0.7 and (scores.logprobs - want).abs().max() <= 1e-5
    dense = torch.full((13, 1000), float("nan")).scatter_(1, scores.topk_ids, scores.topk_logprobs)
    assert (dense - ref[10:23].float()).abs().max() <= 1e-5
    t.close()
    t1 = teacher(handle.url)                                             # what SGLang returns: T = 1
    plain = asyncio.run(t1.ascore(IDS, 13))
    assert plain.temperature == 1.0 and (plain.logprobs - scores.logprobs).abs().max() > 1e-3
    t1.close()


def test_a_batch_is_rescaled_per_sample(engine_and_hf):
    """The rescale runs once over a whole coalesced batch: each sample still gets exactly its own rows."""
    handle, hf = engine_and_hf
    t = teacher(handle.url, top_logprobs_num=1000, temperature=0.7, coalesce_ms=50)
    items = [(IDS, 13), (IDS[:7], 3), ([5, 900, 31, 444], 2), (IDS[:12], 1)]
    batched = asyncio.run(t.ascore_many(items))
    assert t._coalescer.batches_sent == 1
    for (ids, r), scores in zip(items, batched):
        ref, p = _hf_lp(hf, ids, 0.7), len(ids) - r
        want = torch.tensor([ref[p - 1 + j, ids[p + j]].item() for j in range(r)])
        assert scores.logprobs.shape == (r,) and (scores.logprobs - want).abs().max() <= 1e-5
        dense = torch.full((r, 1000), float("nan")).scatter_(1, scores.topk_ids, scores.topk_logprobs)
        assert (dense - ref[p - 1:p - 1 + r].float()).abs().max() <= 1e-5
    t.close()
