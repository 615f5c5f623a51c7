"""Request parsing and validation (no model): SGLang's defaults and messages, our extra checks."""
from __future__ import annotations

import pytest

from opd_train.serving.protocol import (ModelLimits, ProtocolError, decode_json_body, parse_generate_request,
                                        parse_sampling_params)
from opd_train.serving.types import TOP_K_ALL

LIMITS = ModelLimits(vocab_size=100, max_context=64)


def parse(body):
    return parse_generate_request(body, LIMITS)


def error(body) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(body)
    return info.value


def test_defaults_match_sglang():
    spec, n = parse_sampling_params(None)
    assert (spec.max_new_tokens, spec.temperature, spec.top_p, spec.top_k, spec.min_p, n) == (128, 1.0, 1.0,
                                                                                                TOP_K_ALL, 0.0, 1)


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-7])
def test_temperature_zero_is_greedy_at_t1(temperature):
    spec, _ = parse_sampling_params({"temperature": temperature})
    assert spec.greedy and spec.temperature == 1.0          # greedy log-probs are raw (T = 1), like SGLang


@pytest.mark.parametrize("sp, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
    ({"temperature": -0.5}, "temperature must be a non-negative finite number, got -0.5."),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"min_p": 2}, "min_p must be in [0, 1], got 2.0."),
    ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens must be in [0, max_new_tokens(2)], got 5."),
    ({"n": 0}, "sampling_params.n must be at least 1, got 0."),
    ({"stop": "abc"}, "stop='abc' is unavailable when skip_tokenizer_init=True"),
    ({"frequency_penalty": 0.5}, "sampling_params.frequency_penalty=0.5 is not supported"),
    ({"temprature": 1.0}, "Unknown sampling_params field(s) ['temprature']"),
    ({"max_new_tokens": "8"}, "sampling_params.max_new_tokens must be an integer"),
])
def test_sampling_param_errors(sp, message):
    err = error({"input_ids": [1, 2], "sampling_params": sp})
    assert message in err.body["error"]["message"] and err.status == 400


def test_single_prompt_n1_is_an_object_else_a_prompt_major_list():
    single = parse({"input_ids": [1, 2, 3]})
    assert single.is_single and len(single.seqs) == 1
    multi = parse({"input_ids": [[1, 2], [3, 4, 5]], "sampling_params": {"n": 3}})
    assert not multi.is_single
    assert [s.input_ids for s in multi.seqs] == [[1, 2]] * 3 + [[3, 4, 5]] * 3
    assert [s.prefill_key for s in multi.seqs] == [0, 0, 0, 1, 1, 1]
    assert not parse({"input_ids": [1, 2], "sampling_params": {"n": 2}}).is_single


def test_seeds_differ_per_sample_but_are_reproducible():
    a = parse({"input_ids": [1, 2], "sampling_params": {"n": 3, "sampling_seed": 7}})
    b = parse({"input_ids": [1, 2], "sampling_params": {"n": 3, "sampling_seed": 7}})
    seeds = [s.sampling.seed for s in a.seqs]
    assert len(set(seeds)) == 3 and seeds == [s.sampling.seed for s in b.seqs]


def test_per_item_lists_and_length_mismatch():
    p = parse({"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "return_logprob": True, "logprob_start_len": [0, 2],
               "top_logprobs_num": [2, 0], "token_ids_logprob": [[1, 2], [3]],
               "sampling_params": [{"max_new_tokens": 0}, {"max_new_tokens": 0}]})
    assert [s.logprob_start_len for s in p.seqs] == [0, 2]
    assert [s.top_logprobs_num for s in p.seqs] == [2, 0]
    assert [s.token_ids_logprob for s in p.seqs] == [[1, 2], [3]]
    err = error({"input_ids": [[1], [2]], "logprob_start_len": [0, 0, 0], "return_logprob": True})
    assert "'logprob_start_len' is a list of 3 items but the batch has 2 prompts" in err.body["error"]["message"]


def test_mixed_n_is_refused():
    err = error({"input_ids": [[1], [2]], "sampling_params": [{"n": 1}, {"n": 2}]})
    assert "parallel_sample_num should be the same" in err.body["error"]["message"]


@pytest.mark.parametrize("ids, where", [([1, -1], "input_ids[1] = -1"), ([[1], [2, 100]], "input_ids[1][1] = 100"),
                                        ([1, True], "input_ids[1] = True")])
def test_bad_ids_are_named(ids, where):
    err = error({"input_ids": ids})
    assert where in err.body.get("error", {}).get("message", "") or "must be a list" in str(err.body)


def test_context_length_is_checked():
    err = error({"input_ids": list(range(60)), "sampling_params": {"max_new_tokens": 10}})
    assert "maximum context length of 64 tokens" in err.body["error"]["message"]


def test_unknown_and_unsupported_fields():
    assert "logprob_start_length" in error({"input_ids": [1], "logprob_start_length": 0}).body["error"]["message"]
    assert "stream=true" in error({"input_ids": [1], "stream": True}).body["error"]["message"]
    assert "send 'input_ids'" in error({"text": "hello"}).body["error"]["message"]
    parse({"input_ids": [1], "stream": False, "return_text_in_logprobs": False, "rid": "abc"})


def test_top_logprobs_num_bounds():
    err = error({"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 101})
    assert "top_logprobs_num must be in [0, vocab_size=100]" in err.body["error"]["message"]
    assert parse({"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 100}).seqs[0].top_logprobs_num


def test_rids():
    assert parse({"input_ids": [1], "rid": "r"}).rids == ["r"]
    assert parse({"input_ids": [[1], [2]], "rid": ["a", "b"], "sampling_params": {"n": 2}}).rids == \
        ["a_0", "a_1", "b_0", "b_1"]


def test_malformed_json_body_shape():
    with pytest.raises(ProtocolError) as info:
        decode_json_body(b'{"input_ids": [1, 2')
    body = info.value.body
    assert list(body) == ["object", "message", "type", "param", "code"] and "json_invalid" in body["message"]
    with pytest.raises(ProtocolError):
        decode_json_body(b"[1, 2]")
