"""Fast in-process tests: settings validation, architecture checks, packing, checkpoint bookkeeping, CPU compat,
the conversion command line. No process group is created here (those tests run in worker processes)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from mg_helpers import load_result
from safetensors.torch import load_file

from opd_train.backends.megatron import checkpoint as ckpt
from opd_train.backends.megatron.arch import arch_from_hf_config, check_tensor_parallel
from opd_train.backends.megatron.config import (CheckpointSettings, LossSettings, ModelSource, OptimizerSettings,
                                                TeacherSettings, TrainerSettings)
from opd_train.backends.megatron.convert import _qkv_from_mcore, _qkv_to_mcore
from opd_train.backends.megatron.engine import describe_parameter_names
from opd_train.backends.megatron.packing import IGNORE_INDEX, TrainBatch, pack_microbatches, plan_microbatches

QWEN3 = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
         "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "tie_word_embeddings": True}


# ---- settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: ModelSource(), "exactly one"),
    (lambda: ModelSource(hf_path="/nonexistent/dir"), "not a directory"),
    (lambda: ModelSource(hf_config=QWEN3, step=3), "needs checkpoint"),
    (lambda: OptimizerSettings(lr=0), "lr must be > 0"),
    (lambda: OptimizerSettings(lr_decay_style="cosine"), "lr_decay_steps"),
    (lambda: OptimizerSettings(adam_beta2=1.0), "adam_beta2"),
    (lambda: CheckpointSettings(save_interval=5), "needs save="),
    (lambda: TeacherSettings(load="/nonexistent"), "--opd-teacher-load"),
    (lambda: TrainerSettings(model=ModelSource(hf_config=QWEN3), temperature=0.0), "temperature"),
    (lambda: LossSettings(reduction="mean"), "sample_mean or token_mean"),
])
def test_settings_reject_bad_values_with_the_field_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_frozen_names_are_summarised_by_layer_ranges():
    """The trainer's 'frozen on this rank' line: whole layers as ranges, partly frozen layers per tensor, other
    names as they are; nothing chosen is dropped and nothing else is named."""
    kinds = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")
    names = (["embedding.word_embeddings.weight"] + [f"decoder.layers.{i}.{k}" for i in range(30) for k in kinds]
             + ["decoder.final_layernorm.weight"])
    chosen = [n for n in names if n.startswith("embedding") or re.match(r"decoder\.layers\.([0-9]|1[0-3]|20)\.", n)
              or re.match(r"decoder\.layers\.(1[5-9]|2[2-4]|29)\.mlp", n)]
    assert describe_parameter_names(chosen, names) == (
        "embedding.word_embeddings.weight, decoder.layers.0-13,20, decoder.layers.15-19,22-24,29.mlp.linear_fc1.weight")
    assert describe_parameter_names(names[:1], names) == "embedding.word_embeddings.weight"


# ---- architecture ---------------------------------------------------------------------------------------------
def test_arch_reads_transformers_4_and_5_rope_layouts():
    v5 = arch_from_hf_config(QWEN3)
    v4 = arch_from_hf_config({**{k: v for k, v in QWEN3.items() if k != "rope_parameters"}, "rope_theta": 1e6})
    assert v5.rope_theta == v4.rope_theta == 1e6
    assert v5.same_shape_as(v4) and v5.qk_norm and not v5.qkv_bias and v5.tied_embeddings
    assert arch_from_hf_config({**QWEN3, "model_type": "qwen2"}).qkv_bias        # Qwen2 always has qkv bias
    llama31 = arch_from_hf_config({**QWEN3, "model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, "rope_parameters": None})
    assert llama31.rope_llama3_factor == 8.0


@pytest.mark.parametrize("patch, match", [
    ({"model_type": "gpt2"}, "not supported"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"use_sliding_window": True}, "sliding_window"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_arch_refuses_what_it_cannot_convert(patch, match):
    with pytest.raises(ValueError, match=match):
        arch_from_hf_config({**QWEN3, **patch})


def test_tensor_parallel_must_divide_heads_and_vocab():
    check_tensor_parallel(arch_from_hf_config(QWEN3), 2)
    with pytest.raises(ValueError, match="vocab_size=250 is not divisible by tensor_parallel=4"):
        check_tensor_parallel(arch_from_hf_config({**QWEN3, "vocab_size": 250, "num_attention_heads": 8,
                                                   "num_key_value_heads": 4, "intermediate_size": 128}), 4)


def test_qkv_interleave_is_per_kv_group_and_invertible():
    arch = arch_from_hf_config(QWEN3)                     # 4 heads, 2 KV groups, head_dim 16, hidden 64
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    fused = _qkv_to_mcore(arch, q, k, v)
    # Group g holds its 2 query heads, then its key head, then its value head.
    assert torch.equal(fused[:32], q[:32]) and torch.equal(fused[32:48], k[:16]) and torch.equal(fused[48:64], v[:16])
    assert torch.equal(fused[64:96], q[32:]) and torch.equal(fused[96:112], k[16:])
    assert all(torch.equal(a, b) for a, b in zip(_qkv_from_mcore(arch, fused), (q, k, v)))
    bias = _qkv_to_mcore(arch, torch.randn(64), torch.randn(32), torch.randn(32))
    assert bias.shape == (128,)


# ---- packing --------------------------------------------------------------------------------------------------
def test_first_fit_decreasing_respects_the_budget():
    lengths = [7, 3, 9, 2, 5, 12, 1]
    plan = plan_microbatches(lengths, 12)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in plan)
    assert len(plan) == 4                                  # 39 tokens: the optimum for bins of 12
    assert plan_microbatches([20, 3], 10) == [[0], [1]]    # oversized sample: a micro-batch of its own


def test_packed_row_layout():
    batch = TrainBatch(tokens=[[1, 2, 3, 4], [5, 6, 7]], response_lengths=[2, 1], loss_masks=[[1, 0], [1]])
    mb = pack_microbatches(batch, 100)[0]
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # Row t scores token t+1 of the same sample: sample 0's response [3, 4] at rows 1-2, sample 1's [7] at 5.
    x = IGNORE_INDEX
    assert mb.targets.tolist() == [x, 3, 4, x, x, 7, x]
    assert mb.spans == [(1, 3), (5, 6)]
    assert mb.loss_mask.tolist() == [0, 1, 0, 0, 0, 1, 0]
    mask = mb.attention_mask[0, 0]                        # True = masked
    assert not mask[2, 0] and mask[0, 2] and mask[4, 3] and not mask[6, 4]   # causal, and blocked across samples
    assert mb.span_mask().tolist() == [[1, 0], [1, 0]]


@pytest.mark.parametrize("batch, match", [
    (TrainBatch(tokens=[[1, 2, 3]], response_lengths=[3]), "leave >= 1 prompt token"),
    (TrainBatch(tokens=[[1, 2, 3]], response_lengths=[0]), "response_length=0"),
    (TrainBatch(tokens=[[1, 2, 999]], response_lengths=[1]), r"\[0, 256\)"),
    (TrainBatch(tokens=[[1, 2, 3]], response_lengths=[2], loss_masks=[[1]]), "loss mask has 1 entries"),
    (TrainBatch(tokens=[], response_lengths=[]), "empty"),
])
def test_batch_validation_names_the_sample(batch, match):
    with pytest.raises(ValueError, match=match):
        batch.validate(256)


# ---- checkpoint bookkeeping -----------------------------------------------------------------------------------
def _fake_iteration(root, step):
    d = os.path.join(root, f"iter_{step:07d}")
    os.makedirs(os.path.join(d, "hf"))
    with open(os.path.join(d, ckpt.META), "w") as f:
        json.dump({"step": step}, f)
    with open(os.path.join(d, "hf", "config.json"), "w") as f:
        json.dump(QWEN3, f)


def test_iteration_resolution_and_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.resolve_iteration(root)
    for step in (3, 7):
        _fake_iteration(root, step)
    os.makedirs(os.path.join(root, "iter_0000009"))          # incomplete (no metadata): never listed
    os.makedirs(os.path.join(root, ".tmp_iter_0000011-abcd"))
    assert ckpt.list_iterations(root) == [3, 7]
    ckpt._update_tracker(root, 7)
    assert ckpt.resolve_iteration(root) == 7 and ckpt.resolve_iteration(root, 3) == 3
    with pytest.raises(FileNotFoundError, match=r"iteration 5 not found .* available iterations: \[3, 7\]"):
        ckpt.resolve_iteration(root, 5)
    assert ckpt.read_arch(root, 3).num_layers == 2
    ckpt._update_tracker(root, 9)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint .*not written by opd"):
        ckpt.resolve_iteration(root)
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # the tracker's own temp files are gone


# ---- CPU compatibility layer ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer does nothing when CUDA is present")
@pytest.mark.filterwarnings("ignore::UserWarning:megatron")
def test_cpu_compat_is_scoped():
    from opd_train.backends.megatron.cpu_compat import cpu_compat
    original = torch.cuda.current_device
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")
    with cpu_compat():
        with cpu_compat():                                  # re-entrant
            t = torch.zeros(2, device="cuda")
            assert t.device.type == "cpu"
            assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
            assert t.to("cuda").device.type == "cpu" and t.cuda() is t
            assert t.type() == "torch.cuda.FloatTensor" and t.type(torch.float64).dtype == torch.float64
            torch.cuda.synchronize()
            torch.cuda.manual_seed(5)
            a = torch.rand(3)
            torch.cuda.manual_seed(5)
            assert torch.equal(torch.rand(3), a)            # the "CUDA" RNG is the CPU generator
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device is original
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")
    assert torch.zeros(2).type() == "torch.FloatTensor"


# ---- the conversion command line ------------------------------------------------------------------------------
TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_hf_to_torch_dist.py")


def test_convert_tool_rejects_bad_arguments_before_any_work(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)
    r = run("--hf-checkpoint", str(tmp_path))
    assert r.returncode == 2 and "give --hf-checkpoint DIR --save DIR" in r.stderr
    r = run("--hf-checkpoint", str(tmp_path), "--save", str(tmp_path / "out"))
    assert r.returncode != 0 and "config.json" in r.stderr


def test_convert_tool_torch_dist_to_hf(single_run, hf_models, tmp_path):
    dist_dir = load_result(single_run, "convert")["qwen2"]["dist_dir"]
    r = subprocess.run([sys.executable, TOOL, "--load", dist_dir, "--hf-save", str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    original = load_file(os.path.join(hf_models["qwen2"], "model.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
