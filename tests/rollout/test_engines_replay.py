"""SGLangEngine against a loopback server replaying the captured SGLang 0.5.23 generation / control exchanges."""
from __future__ import annotations

import asyncio
import json
import pathlib

import pytest

from loopback import LoopbackServer, Reply

from opd_train.http import RequestFailed, RetryPolicy
from opd_train.rollout.engines import SamplingParams, SGLangEngine

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"
GENERATE = ["generate_batch_sampled", "generate_batch_sampled_repeat", "generate_greedy_logprob",
            "generate_greedy_logprob_start0_top2", "generate_no_logprob", "generate_sampled_temp0_5",
            "generate_stop_token", "generate_stop_token_ignore_eos", "error_missing_sampling_params"]


def capture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def engine(url: str, **kw) -> SGLangEngine:
    return SGLangEngine(url, vocab_size=1000, policy=RetryPolicy(backoff=0.01, max_retries=2, timeout=5), **kw)


def _params(sp: dict) -> SamplingParams:
    return SamplingParams(max_new_tokens=sp.get("max_new_tokens", 128), temperature=sp.get("temperature", 1.0),
                          stop_token_ids=tuple(sp.get("stop_token_ids", ())), ignore_eos=sp.get("ignore_eos", False),
                          seed=sp.get("sampling_seed"))


@pytest.mark.parametrize("name", GENERATE)
def test_generation_capture_replay(name):
    cap = capture(name)
    req, resp = cap["request"], cap["response"]
    prompts = req["input_ids"] if isinstance(req["input_ids"][0], list) else [req["input_ids"]]
    sp = req.get("sampling_params", {})
    n = sp.get("n", 1)
    items = resp if isinstance(resp, list) else [resp]
    if "output_token_logprobs" not in items[0]["meta_info"]:
        # generate_no_logprob: our engine always asks for log-probs, so a body without them is invalid for it.
        with LoopbackServer(default=Reply(200, resp)) as srv:
            with pytest.raises(RequestFailed, match="output_token_logprobs"):
                engine(srv.url).generate(prompts, _params(sp), n=n)
        return
    with LoopbackServer(default=Reply(200, resp)) as srv:
        eng = engine(srv.url)
        groups = eng.generate(prompts, _params(sp), n=n)
        eng.shutdown()
        sent = srv.requests[0][1]
    assert sent["input_ids"] == prompts                  # always the batch form
    assert sent["return_logprob"] is True and sent["sampling_params"]["n"] == n
    assert [len(g) for g in groups] == [n] * len(prompts)
    for k, item in enumerate(items):
        gen = groups[k // n][k % n]                       # prompt-major order
        assert gen.prompt_ids == prompts[k // n]
        assert gen.output_ids == item["output_ids"]
        assert gen.output_logprobs == [e[0] for e in item["meta_info"]["output_token_logprobs"]]
        assert gen.finish_reason == item["meta_info"]["finish_reason"]["type"]
        assert gen.meta["prompt_tokens"] == len(gen.prompt_ids)


def test_control_captures_replay():
    caps = {n: capture(n) for n in ("health", "health_generate", "health_generate_end", "flush_cache",
                                    "get_server_info", "model_info", "model_info_after_update",
                                    "update_weights_from_disk", "update_weights_from_disk_bad_path")}

    def route(path, body):
        if path == "/update_weights_from_disk":
            name = "update_weights_from_disk" if "v2" in body["model_path"] else "update_weights_from_disk_bad_path"
            return Reply(caps[name]["status"], caps[name]["response"])
        name = {"/health": "health", "/health_generate": "health_generate", "/flush_cache": "flush_cache",
                "/get_server_info": "get_server_info"}[path]
        body = caps[name]["response"]
        return Reply(caps[name]["status"], body, content_type="text/plain" if isinstance(body, str) else
                     "application/json")

    with LoopbackServer(default=route) as srv:
        eng = engine(srv.url)
        assert eng.health() and eng.health(generate=True)
        eng.flush_cache()
        assert eng.server_info()["version"] == caps["get_server_info"]["response"]["version"]
        eng.update_weights_from_disk("<models>/tiny-qwen3-v2", weight_version="v2")
        with pytest.raises(RuntimeError, match="Failed to get weights iterator"):
            eng.update_weights_from_disk("/nonexistent/model")
        eng.shutdown()
    assert srv.count("/update_weights_from_disk") == 2            # a 400 is not retried


def test_generation_faults_retry_then_fail_with_url():
    cap = capture("generate_greedy_logprob")
    prompt = cap["request"]["input_ids"]
    with LoopbackServer(default=Reply(200, cap["response"])) as srv:
        srv.script(Reply(drop=True), Reply(502, b"bad gateway", content_type="text/plain"))
        eng = engine(srv.url)
        out = asyncio.run(eng.agenerate([prompt], SamplingParams(max_new_tokens=16, temperature=0)))
        assert out[0][0].output_ids == cap["response"]["output_ids"] and srv.count("/generate") == 3
        truncated = json.loads(json.dumps(cap["response"]))
        truncated["meta_info"]["output_token_logprobs"].pop()
        srv.default = Reply(200, truncated)
        with pytest.raises(RequestFailed, match=f"{srv.url}/generate failed after 3 attempt"):
            eng.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0))
        eng.shutdown()


def test_bad_ids_are_refused_before_sending():
    with LoopbackServer(default=Reply(500, {})) as srv:
        eng = engine(srv.url)
        for bad in ([[1, -1]], [[1, 1000]], [[]]):
            with pytest.raises(ValueError):
                eng.generate(bad, SamplingParams(max_new_tokens=2))
        assert srv.requests == []


def test_concurrent_generate_calls_share_one_request():
    cap = capture("generate_batch_sampled")
    p1, p2 = cap["request"]["input_ids"]
    with LoopbackServer(default=Reply(200, cap["response"])) as srv:
        eng = engine(srv.url, coalesce_ms=50)
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1234)

        async def per_group():
            return await asyncio.gather(eng.agenerate([p1], params, n=2), eng.agenerate([p2], params, n=2))

        first, second = asyncio.run(per_group())
        assert srv.count("/generate") == 1 and srv.requests[0][1]["input_ids"] == [p1, p2]
        assert [g.output_ids for g in first[0]] == [x["output_ids"] for x in cap["response"][:2]]
        assert [g.output_ids for g in second[0]] == [x["output_ids"] for x in cap["response"][2:]]
        other = SamplingParams(max_new_tokens=8, temperature=0.5)

        async def mixed():                         # different settings never share a request
            return await asyncio.gather(eng.agenerate([p1], params, n=2), eng.agenerate([p2], other, n=2))

        srv.default = Reply(200, cap["response"][:2])
        asyncio.run(mixed())
        assert srv.count("/generate") == 3
        eng.shutdown()
