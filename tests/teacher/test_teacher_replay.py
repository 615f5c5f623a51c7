"""The SGLang teacher client against a loopback server that returns the captured SGLang 0.5.23 bodies.

Each scoring capture is replayed with the prompt length that makes our client send exactly the captured request
(``logprob_start_len = prompt_len - 1``), and the client must return exactly the captured response-span values.
Error captures check the client's reaction: 4xx is reported at once with the server's message, a dropped connection
(what SGLang does when it crashes) is retried and then reported naming the URL, bad ids never leave the client.
"""
from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
import torch

from opd_train.http import RequestFailed
from loopback import LoopbackServer, Reply
from opd_train.teacher import SGLangTeacher, SGLangTeacherConfig

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"

# capture -> prompt_len that reproduces its logprob_start_len (K = prompt_len - 1), top_logprobs_num
SCORING = {"score_single_start0": (1, 0), "score_single_start0_cached": (1, 0), "score_temperature": (1, 0),
           "score_temperature0": (1, 0), "score_single_start_k": (11, 0), "score_top_logprobs": (1, 5),
           "score_token_ids_logprob": (1, 0), "score_single_start0_after_update": (1, 0),
           "score_single_start0_after_bad_update": (1, 0)}
REJECTED = ["error_empty_input_ids", "error_negative_max_new_tokens", "error_logprob_start_len_gt_len",
            "error_no_input", "error_malformed_json", "error_wrong_type_input_ids"]
CRASHES = ["error_input_id_negative", "error_input_id_beyond_padded_vocab"]
BAD_IDS = ["error_input_id_oob", "error_input_id_padded_max", "error_input_id_negative",
           "error_input_id_beyond_padded_vocab"]
# Generation / control captures are replayed through SGLangEngine in tests/rollout/test_engines_replay.py.
ENGINE_SIDE = {"edge_logprob_start_len_eq_len", "error_missing_sampling_params", "flush_cache",
               "generate_batch_sampled", "generate_batch_sampled_repeat", "generate_greedy_logprob",
               "generate_greedy_logprob_start0_top2", "generate_no_logprob", "generate_sampled_temp0_5",
               "generate_stop_token", "generate_stop_token_ignore_eos", "get_server_info", "health",
               "health_generate", "health_generate_end", "model_info", "model_info_after_update",
               "update_weights_from_disk", "update_weights_from_disk_bad_path"}


def capture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def teacher(url: str, **kw) -> SGLangTeacher:
    kw.setdefault("vocab_size", 1000)
    kw.setdefault("backoff", 0.01)
    return SGLangTeacher(SGLangTeacherConfig(url=url + "/generate", **kw))


def test_every_capture_is_replayed_somewhere():
    names = {p.stem for p in FIXTURES.glob("*.json")} - {"hf_comparison"}
    assert names == set(SCORING) | {"score_batch"} | set(REJECTED) | set(BAD_IDS) | ENGINE_SIDE


@pytest.mark.parametrize("name", sorted(SCORING))
def test_scoring_capture_replay(name):
    cap = capture(name)
    prompt_len, topk = SCORING[name]
    ids = cap["request"]["input_ids"]
    with LoopbackServer(default=Reply(200, cap["response"])) as srv:
        t = teacher(srv.url, top_logprobs_num=topk)
        scores = asyncio.run(t.ascore(ids, len(ids) - prompt_len))
        t.close()
        sent = srv.requests[0][1]
    expected_request = {k: v for k, v in cap["request"].items() if k != "token_ids_logprob"}
    # The temperature captures sent 0.5 / 0 and got bitwise the T=1 values: the client always sends 1.0.
    expected_request["sampling_params"] = {**expected_request["sampling_params"], "temperature": 1.0}
    assert sent == expected_request                    # otherwise exactly the request SGLang answered
    entries = cap["response"]["meta_info"]["input_token_logprobs"]
    assert torch.equal(scores.logprobs, torch.tensor([e[0] for e in entries[1:]], dtype=torch.float32))
    assert scores.logprobs.shape == (len(ids) - prompt_len,) and scores.temperature == 1.0
    if topk:
        tops = cap["response"]["meta_info"]["input_top_logprobs"][1:]
        assert scores.topk_ids.tolist() == [[e[1] for e in row] for row in tops]
        assert torch.equal(scores.topk_logprobs, torch.tensor([[e[0] for e in r] for r in tops]))


def test_score_batch_capture_replay():
    cap = capture("score_batch")
    seqs = cap["request"]["input_ids"]
    with LoopbackServer(default=Reply(200, cap["response"])) as srv:
        t = teacher(srv.url)
        out = asyncio.run(t.ascore_many([(s, len(s) - 1) for s in seqs]))
        t.close()
        sent = srv.requests[0][1]
    assert len(srv.requests) == 1 and sent["input_ids"] == seqs and sent["logprob_start_len"] == [0, 0, 0]
    for scores, item in zip(out, cap["response"]):
        assert scores.logprobs.tolist() == [pytest.approx(e[0], abs=0) for e in
                                             item["meta_info"]["input_token_logprobs"][1:]]


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_requests_are_not_retried_and_report_the_server_message(name):
    cap = capture(name)
    body = cap["response"]
    with LoopbackServer(default=Reply(cap["status"], body)) as srv:
        t = teacher(srv.url, max_retries=3)
        with pytest.raises(RequestFailed) as info:
            asyncio.run(t.ascore([1, 2, 3], 2))
        t.close()
        assert srv.count("/generate") == 1
    message = body["error"]["message"] if "error" in body else body["message"]
    assert f"{srv.url}/generate" in str(info.value) and message[:40] in str(info.value)
    assert info.value.status == 400


@pytest.mark.parametrize("name", CRASHES)
def test_crash_captures_are_retried_then_name_the_url(name):
    assert capture(name)["status"] is None                    # SGLang closed the connection and died
    with LoopbackServer(default=Reply(drop=True)) as srv:
        t = teacher(srv.url, max_retries=2)
        with pytest.raises(RequestFailed) as info:
            asyncio.run(t.ascore([1, 2, 3], 2))
        t.close()
        assert srv.count("/generate") == 3
    assert f"{srv.url}/generate failed after 3 attempt(s)" in str(info.value)


@pytest.mark.parametrize("name", BAD_IDS)
def test_ids_that_break_sglang_never_leave_the_client(name):
    ids = capture(name)["request"]["input_ids"]
    with LoopbackServer(default=Reply(500, {})) as srv:
        t = teacher(srv.url)
        with pytest.raises(ValueError, match=r"is not a token id in \[0, 1000\)"):
            asyncio.run(t.ascore(ids, 1))
        t.close()
        assert srv.requests == []
