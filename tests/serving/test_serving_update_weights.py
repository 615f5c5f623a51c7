"""update_weights_from_disk: scores become the new model's; a failed update keeps the old weights."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from serving_helpers import MODEL_V1, MODEL_V2, capture, get, hf_logprobs, post

from opd_train.serving import ServerConfig, start_in_thread

IDS = capture("score_single_start0")["request"]["input_ids"]
SCORE = {"input_ids": IDS, "return_logprob": True, "logprob_start_len": 0,
         "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}


@pytest.fixture()
def fresh():
    handle = start_in_thread(ServerConfig(model_path=MODEL_V1, port=0, num_threads=1))
    yield handle
    handle.stop()


def _scores(url):
    status, body = post(url + "/generate", SCORE)
    assert status == 200
    return torch.tensor([e[0] for e in body["meta_info"]["input_token_logprobs"][1:]]), body["meta_info"]


def _ref(model):
    lp = hf_logprobs(model, IDS)
    return torch.tensor([lp[j, IDS[j + 1]].item() for j in range(len(IDS) - 1)])


def test_update_changes_scores_to_v2(fresh, hf_v1, hf_v2):
    before, _ = _scores(fresh.url)
    assert (before - _ref(hf_v1)).abs().max() <= 1e-5
    cap = capture("update_weights_from_disk")
    status, body = post(fresh.url + "/update_weights_from_disk", {**cap["request"], "model_path": MODEL_V2})
    assert (status, body) == (cap["status"], cap["response"])
    after, meta = _scores(fresh.url)
    assert (after - _ref(hf_v2)).abs().max() <= 1e-5
    assert (after - before).abs().max() > 0.1                        # really different weights
    captured = capture("score_single_start0_after_update")["response"]["meta_info"]
    assert (after - torch.tensor([e[0] for e in captured["input_token_logprobs"][1:]])).abs().max() <= 1e-5
    assert meta["weight_version"] == "v2" and meta["weight_versions"] == captured["weight_versions"]
    info = json.loads(get(fresh.url + "/model_info")[1])
    assert info["weight_version"] == "v2" and info["model_path"] == MODEL_V2 and info["tokenizer_path"] == MODEL_V1


@pytest.mark.parametrize("case", ["missing_dir", "wrong_arch", "truncated", "no_path"])
def test_failed_update_keeps_weights(fresh, hf_v1, tmp_path, case):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if case == "missing_dir":
        path = "/nonexistent/model"
    elif case == "wrong_arch":
        Qwen3ForCausalLM(Qwen3Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     tie_word_embeddings=True)).save_pretrained(tmp_path)
        path = str(tmp_path)
    elif case == "truncated":
        shutil.copy(f"{MODEL_V2}/config.json", tmp_path / "config.json")
        data = open(f"{MODEL_V2}/model.safetensors", "rb").read()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
        path = str(tmp_path)
    else:
        path = None
    status, body = post(fresh.url + "/update_weights_from_disk", {"model_path": path} if path else {})
    assert status == 400 and body["success"] is False and body["num_paused_requests"] == 0
    assert list(body) == list(capture("update_weights_from_disk_bad_path")["response"])
    expected = {"missing_dir": "is not a directory", "wrong_arch": "hidden_size=32", "truncated": "Failed to read",
                "no_path": "model_path"}[case]
    assert expected in body["message"]
    after, meta = _scores(fresh.url)
    assert (after - _ref(hf_v1)).abs().max() <= 1e-5 and meta["weight_version"] == "default"


def test_update_waits_for_running_generation(fresh):
    """A weight update issued while a long generation runs lands after it: that generation is all old weights."""
    import threading
    results = {}

    def long_generation():
        results["gen"] = post(fresh.url + "/generate", {"input_ids": IDS[:4], "sampling_params": {
            "max_new_tokens": 200, "temperature": 0}})

    thread = threading.Thread(target=long_generation)
    thread.start()
    while fresh.state.scheduler.num_running == 0 and thread.is_alive():
        time.sleep(0.001)
    status, _ = post(fresh.url + "/update_weights_from_disk", {"model_path": MODEL_V2, "weight_version": "v2"})
    thread.join(60)
    assert status == 200
    gen_status, gen = results["gen"]
    assert gen_status == 200 and gen["meta_info"]["weight_version"] == "default"
    assert len(gen["output_ids"]) == 200


def test_in_process_update_from_tensors(fresh, hf_v2):
    from safetensors.torch import load_file
    fresh.update_weights_from_tensors(load_file(f"{MODEL_V2}/model.safetensors"), weight_version="t2")
    after, meta = _scores(fresh.url)
    assert (after - _ref(hf_v2)).abs().max() <= 1e-5 and meta["weight_version"] == "t2"
    with pytest.raises(ValueError, match="lacks tensors"):
        fresh.update_weights_from_tensors({"model.norm.weight": torch.ones(64)})
