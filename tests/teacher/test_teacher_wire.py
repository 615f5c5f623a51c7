"""Response-span alignment against real SGLang 0.5.23 captures (logprob_start_len 0 and k), checked against HF."""
import copy
import json
from pathlib import Path

import pytest
import torch

from opd_train.teacher.wire import response_logprobs_from_sglang, response_topk_from_sglang

# The real captures (and the tiny Qwen3 they served), vendored by the repo from ../shared/fixtures/sglang-0.5.23.
DATA = Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"


def load(name):
    return json.loads((DATA / f"{name}.json").read_text())


def meta(name, item=None):
    response = load(name)["response"]
    return (response if item is None else response[item])["meta_info"]


def request_ids(name, item=None):
    ids = load(name)["request"]["input_ids"]
    return ids if item is None else ids[item]


@pytest.mark.parametrize("prompt_len", [1, 5, 12, 23])
def test_start0_gives_exactly_the_response_span(prompt_len):
    entries = meta("score_single_start0")["input_token_logprobs"]
    assert len(entries) == 24 and entries[0][0] is None
    R = 24 - prompt_len
    out = response_logprobs_from_sglang(entries, prompt_len=prompt_len, response_len=R, logprob_start_len=0)
    assert out.shape == (R,) and out.dtype == torch.float32
    assert out.tolist() == torch.tensor([e[0] for e in entries[prompt_len:]], dtype=torch.float32).tolist()


@pytest.mark.parametrize("prompt_len", [11, 16, 24])
def test_start_k_agrees_with_start0(prompt_len):
    """Two independent requests (K = 0 and K = 10) must give the same response span, bitwise."""
    R = 24 - prompt_len
    from_k = response_logprobs_from_sglang(meta("score_single_start_k")["input_token_logprobs"],
                                           prompt_len=prompt_len, response_len=R, logprob_start_len=10)
    from_0 = response_logprobs_from_sglang(meta("score_single_start0")["input_token_logprobs"],
                                           prompt_len=prompt_len, response_len=R, logprob_start_len=0)
    assert from_k.shape == (R,)
    assert torch.equal(from_k, from_0)


def test_batch_items_align_independently():
    for item, total in enumerate([24, 10, 17]):
        entries = meta("score_batch", item)["input_token_logprobs"]
        out = response_logprobs_from_sglang(entries, prompt_len=4, response_len=total - 4, logprob_start_len=0)
        assert out.shape == (total - 4,)
        assert out.tolist() == torch.tensor([e[0] for e in entries[4:]]).tolist()


def test_aligned_logprobs_equal_hf_recomputation():
    """Entry r of the span is log p(response[r] | prompt, response[:r]) of the served model (HF fp32)."""
    from transformers import Qwen3ForCausalLM
    model = Qwen3ForCausalLM.from_pretrained(DATA / "model", dtype=torch.float32).eval()
    ids = request_ids("score_single_start_k")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)          # [24, V]
    P = 11
    expected = logp[P - 1:-1].gather(-1, torch.tensor(ids[P:])[:, None])[:, 0]              # [13]
    out = response_logprobs_from_sglang(meta("score_single_start_k")["input_token_logprobs"], prompt_len=P,
                                        response_len=24 - P, logprob_start_len=10)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    ids_k, vals_k = response_topk_from_sglang(meta("score_top_logprobs")["input_top_logprobs"], prompt_len=P,
                                              response_len=24 - P, logprob_start_len=0)
    hf_vals, hf_ids = logp[P - 1:-1].topk(5, -1)
    assert torch.equal(ids_k, hf_ids)
    torch.testing.assert_close(vals_k, hf_vals, rtol=0, atol=2e-6)


def test_topk_span_shapes_and_consistency():
    m = meta("score_top_logprobs")
    assert m["input_top_logprobs"][0] is None
    P, R = 8, 16
    ids, vals = response_topk_from_sglang(m["input_top_logprobs"], prompt_len=P, response_len=R, logprob_start_len=0)
    assert ids.shape == vals.shape == (R, 5) and ids.dtype == torch.int64 and vals.dtype == torch.float32
    assert bool((vals[:, :-1] >= vals[:, 1:]).all())                        # sorted by logprob
    assert bool(((ids >= 0) & (ids < 1000)).all())
    sampled = response_logprobs_from_sglang(m["input_token_logprobs"], prompt_len=P, response_len=R,
                                            logprob_start_len=0)
    response_ids = torch.tensor(request_ids("score_top_logprobs")[P:])
    assert bool((sampled <= vals[:, 0] + 1e-6).all())                       # no token beats the top-1
    hit = ids == response_ids[:, None]                                       # the sampled token is in the top-k
    rows = hit.any(-1)
    torch.testing.assert_close(vals[hit], sampled[rows])


def test_generate_response_with_prompt_logprobs_and_top2():
    m = meta("generate_greedy_logprob_start0_top2")
    ids, vals = response_topk_from_sglang(m["input_top_logprobs"], prompt_len=3, response_len=5, logprob_start_len=0)
    assert ids.shape == (5, 2)
    lp = response_logprobs_from_sglang(m["input_token_logprobs"], prompt_len=3, response_len=5, logprob_start_len=0)
    assert lp.shape == (5,)


def test_empty_response():
    out = response_logprobs_from_sglang(meta("score_single_start_k")["input_token_logprobs"], prompt_len=24,
                                        response_len=0, logprob_start_len=10)
    assert out.shape == (0,)
    ids, vals = response_topk_from_sglang([None], prompt_len=5, response_len=0, logprob_start_len=4)
    assert ids.shape == (0, 0) and vals.shape == (0, 0)


def test_length_mismatches_are_clear_errors():
    k_entries = meta("score_single_start_k")["input_token_logprobs"]
    with pytest.raises(ValueError, match=r"returned 14 input_token_logprobs entries but .* = 15 were expected"):
        response_logprobs_from_sglang(k_entries, prompt_len=11, response_len=13, logprob_start_len=9)
    entries0 = meta("score_single_start0")["input_token_logprobs"]
    with pytest.raises(ValueError, match="= 25 were expected"):
        response_logprobs_from_sglang(entries0, prompt_len=5, response_len=20, logprob_start_len=0)
    with pytest.raises(ValueError, match="request logprob_start_len = prompt_len - 1"):
        response_logprobs_from_sglang(k_entries, prompt_len=10, response_len=14, logprob_start_len=10)
    # the real capture for logprob_start_len == len(input_ids): an empty list, and an invalid K for a response
    edge = meta("edge_logprob_start_len_eq_len")["input_token_logprobs"]
    assert edge == []
    with pytest.raises(ValueError, match="logprob_start_len=24 must be in"):
        response_logprobs_from_sglang(edge, prompt_len=24, response_len=0, logprob_start_len=24)
    top = meta("score_top_logprobs")["input_top_logprobs"]
    with pytest.raises(ValueError, match="input_top_logprobs entries"):
        response_topk_from_sglang(top, prompt_len=8, response_len=17, logprob_start_len=0)


def test_bad_entries_are_clear_errors():
    entries = copy.deepcopy(meta("score_single_start0")["input_token_logprobs"])
    entries[5][0] = None
    with pytest.raises(ValueError, match=r"response token 2 \(input_token_logprobs\[5\]\).*null"):
        response_logprobs_from_sglang(entries, prompt_len=3, response_len=21, logprob_start_len=0)
    with pytest.raises(TypeError, match="prompt_len must be an int"):
        response_logprobs_from_sglang(entries, prompt_len=3.0, response_len=21, logprob_start_len=0)
    with pytest.raises(TypeError, match="list of triples"):
        response_logprobs_from_sglang({"a": 1}, prompt_len=1, response_len=0, logprob_start_len=0)
    top = copy.deepcopy(meta("score_top_logprobs")["input_top_logprobs"])
    top[10] = top[10][:4]
    with pytest.raises(ValueError, match=r"response token 2 .*4 top-k entries but earlier rows have 5"):
        response_topk_from_sglang(top, prompt_len=8, response_len=16, logprob_start_len=0)
    top[10] = None
    with pytest.raises(ValueError, match="top_logprobs_num > 0"):
        response_topk_from_sglang(top, prompt_len=8, response_len=16, logprob_start_len=0)


@pytest.mark.parametrize("bad, message", [
    (True, "logprob must be a number"),                 # a bool is an int to Python, never a log-prob
    ("-1.5", "logprob must be a number"),
    ({"0": -1.0}, "expected a \\[logprob, token_id, text\\] triple"),
])
def test_entries_the_fast_path_must_not_accept(bad, message):
    """The bulk conversion takes only real numbers in well-formed triples; anything else reaches the per-entry
    checks, which name the position (bool -> 1.0 or "-1.5" -> -1.5 would otherwise pass silently)."""
    entries = copy.deepcopy(meta("score_single_start0")["input_token_logprobs"])
    entries[5] = bad if isinstance(bad, dict) else [bad, entries[5][1], None]
    with pytest.raises(ValueError, match=r"response token 2 \(input_token_logprobs\[5\]\).*" + message):
        response_logprobs_from_sglang(entries, prompt_len=3, response_len=21, logprob_start_len=0)
    top = copy.deepcopy(meta("score_top_logprobs")["input_top_logprobs"])
    top[10][3] = [top[10][3][0], bad, None] if not isinstance(bad, dict) else bad
    with pytest.raises(ValueError, match=r"response token 2 \(input_top_logprobs\[10\]\)\[3\]"):
        response_topk_from_sglang(top, prompt_len=8, response_len=16, logprob_start_len=0)


def test_fast_path_equals_per_entry_reading():
    top = meta("score_top_logprobs")["input_top_logprobs"]
    ids, vals = response_topk_from_sglang(top, prompt_len=8, response_len=16, logprob_start_len=0)
    assert ids.dtype == torch.int64 and vals.dtype == torch.float32 and ids.shape == vals.shape == (16, 5)
    assert ids.tolist() == [[e[1] for e in row] for row in top[8:]]             # the span: positions 8..23
    assert torch.equal(vals, torch.tensor([[e[0] for e in row] for row in top[8:]], dtype=torch.float32))
    as_tuples = [None] + [tuple(tuple(e) for e in row) for row in top[1:]]      # tuples read the same
    ids_t, vals_t = response_topk_from_sglang(as_tuples, prompt_len=8, response_len=16, logprob_start_len=0)
    assert torch.equal(ids_t, ids) and torch.equal(vals_t, vals)
