"""HF <-> Megatron: logits equal transformers', the HF -> torch_dist -> HF round trip is bit-exact, packing and
temperature are exact, and ``export_hf`` writes what the rollout engines load."""
from __future__ import annotations

import json
import os

import pytest
import torch
from mg_helpers import hf_logprobs, load_result
from safetensors.torch import load_file

FAMILIES = ("qwen3", "qwen3_tied", "qwen2", "llama")


def _weights(directory: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture(scope="module")
def converted(single_run):
    return load_result(single_run, "convert")


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_transformers(converted, hf_models, family):
    import transformers
    tokens = converted["batch"]["tokens"][0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_models[family], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    got = converted[family]["logits"]
    assert got.shape == expected.shape == (len(tokens), 256)
    assert (got - expected).abs().max().item() <= 1e-5
    # Loading the converted torch_dist checkpoint gives the very same model.
    assert torch.equal(converted[family]["logits_from_dist"], got)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_torch_dist_hf_round_trip_is_bit_exact(converted, hf_models, family):
    original, back = _weights(hf_models[family]), _weights(converted[family]["back"])
    if family == "qwen3_tied":   # transformers does not store the tied lm_head
        original.pop("lm_head.weight", None)
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with open(os.path.join(hf_models[family], "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(converted[family]["back"], "config.json")) as f:
        cfg_back = json.load(f)
    assert {k: v for k, v in cfg_back.items() if "dtype" not in k} == {k: v for k, v in cfg.items()
                                                                       if "dtype" not in k}
    # Tokenizer-side files travel HF -> checkpoint -> HF.
    assert os.path.isfile(os.path.join(converted[family]["back"], "tokenizer_config.json"))


def test_converted_checkpoint_layout(converted):
    directory = converted["qwen3"]["dist_dir"]
    assert converted["qwen3"]["iterations"] == [0]
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "0"
    iteration = os.path.join(directory, "iter_0000000")
    assert os.path.isfile(os.path.join(iteration, "hf", "config.json"))      # self-describing
    assert os.path.isfile(os.path.join(iteration, "metadata.json"))          # Megatron torch_dist
    assert any(n.endswith(".distcp") for n in os.listdir(iteration))
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp")]


@pytest.fixture(scope="module")
def packing(single_run):
    return load_result(single_run, "packing")


def test_packed_microbatches_equal_unpacked(packing):
    # The packed run really packed several samples into one row; the single run put one sample per row.
    assert max(len(ids) for ids in packing["packed"]["microbatches"]) >= 2
    assert all(len(ids) == 1 for ids in packing["single"]["microbatches"])
    for key in ("logprobs", "entropy"):
        for a, b in zip(packing["packed"][key], packing["single"][key]):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 2e-6


def test_logprobs_and_entropy_at_temperature_match_transformers(packing, hf_models):
    batch, temp = packing["batch"], packing["temperature"]
    expected, rows = hf_logprobs(hf_models["qwen3"], batch["tokens"], batch["response_lengths"], temperature=temp)
    for got, ref in zip(packing["packed"]["logprobs"], expected):
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() <= 1e-5
    for got, row in zip(packing["packed"]["entropy"], rows):
        ref = -(row.exp() * row).sum(-1)
        assert (got.double() - ref).abs().max().item() <= 1e-5


def test_export_hf_writes_a_loadable_model(packing, hf_models):
    export = packing["export_dir"]
    original = _weights(hf_models["qwen3"])
    exported = _weights(export)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    for name in ("config.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(export, name))
    parent = os.path.dirname(export)
    assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(export)}.tmp")]
