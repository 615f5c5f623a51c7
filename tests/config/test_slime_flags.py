"""slime's command lines: its two OPD recipes' arguments go through opd-train's parsing and validation.

The lists below are what slime's ``run-qwen3-8B-opd.sh`` (SGLang teacher) and its Megatron-teacher recipe pass to
``train.py``: MODEL_ARGS of ``scripts/models/qwen3-8B.sh`` (Megatron shape flags), CKPT / ROLLOUT / EVAL / PERF /
GRPO / OPTIMIZER / SGLANG / MISC args. Only the paths differ (a tiny Qwen3 with the Qwen3-8B shape written here,
our prompt file; the reward hooks are opd_train's, as slime's examples module does not exist here).
"""
from __future__ import annotations

import json

import pytest

from opd_train import cli
from opd_train.config import ConfigError, build_config, validate

QWEN3_8B = dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                rope_theta=1000000, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=40960)
MODEL_ARGS = ["--swiglu", "--num-layers", "36", "--hidden-size", "4096", "--ffn-hidden-size", "12288",
              "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
              "--use-rotary-position-embeddings", "--disable-bias-linear", "--normalization", "RMSNorm",
              "--norm-epsilon", "1e-6", "--rotary-base", "1000000", "--vocab-size", "151936", "--kv-channels", "128",
              "--qk-layernorm", "--untie-embeddings-and-output-weights"]


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "Qwen3-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))
    data = tmp_path / "dapo.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "2"}\n')
    teacher = tmp_path / "Qwen3-32B_torch_dist"
    (teacher / "iter_0000000" / "hf").mkdir(parents=True)
    (teacher / "iter_0000000" / "hf" / "config.json").write_text(json.dumps(QWEN3_8B))
    (teacher / "latest_checkpointed_iteration.txt").write_text("0")
    return {"model": str(model), "data": str(data), "teacher": str(teacher), "tmp": tmp_path}


def _common(p):
    return [*MODEL_ARGS,
            "--hf-checkpoint", p["model"], "--ref-load", p["model"], "--load", str(p["tmp"] / "slime"),
            "--save", str(p["tmp"] / "slime"), "--save-interval", "20",
            "--prompt-data", p["data"], "--input-key", "prompt", "--apply-chat-template", "--rollout-shuffle",
            "--num-rollout", "300", "--rollout-batch-size", "16", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "16384", "--rollout-temperature", "1", "--global-batch-size", "64",
            "--balance-data", "--eval-interval", "20", "--eval-prompt-data", "aime", p["data"],
            "--n-samples-per-eval-prompt", "16", "--eval-max-response-len", "16384", "--eval-top-p", "1",
            "--rm-type", "math",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "1",
            "--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
            "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", "16384",
            "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.00", "--kl-loss-type",
            "low_var_kl", "--entropy-coef", "0.00",
            "--optimizer", "adam", "--lr", "1e-6", "--lr-decay-style", "constant", "--weight-decay", "0.1",
            "--adam-beta1", "0.9", "--adam-beta2", "0.98",
            "--rollout-num-gpus-per-engine", "1", "--sglang-mem-fraction-static", "0.4",
            "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32",
            "--attention-softmax-in-fp32", "--attention-backend", "flash",
            "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "4"]


def _parse(argv):
    return cli.training_values(cli.build_parser(), argv)


def test_the_sglang_recipe(paths, capsys):
    argv = _common(paths) + ["--use-opd", "--opd-type", "sglang",
                             "--custom-rm-path", "opd_train.rollout.on_policy_distillation.reward_func",
                             "--custom-reward-post-process-path",
                             "opd_train.rollout.on_policy_distillation.post_process_rewards",
                             "--rm-url", "http://127.0.0.1:13141/generate"]
    values = _parse(argv)
    c = validate(build_config(values), cuda_available=True)
    assert c.plan.teacher == "sglang" and c.plan.kl == "k1"
    assert c.algo.kl_loss_type == "low_var_kl" and c.data.eval_prompt_data == paths["data"]
    assert c.rollout.sglang_extra_args == "--mem-fraction-static 0.4"
    notes = capsys.readouterr().err
    for flag in ("--balance-data", "--use-dynamic-batch-size", "--rollout-num-gpus 4", "--sequence-parallel",
                 "--attention-backend flash"):
        assert f"opd-train: note: {flag}: ignored" in notes, flag
    assert "--pipeline-model-parallel-size 1: what opd-train does anyway" in notes


def test_the_megatron_recipe(paths, capsys):
    argv = _common(paths) + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", paths["teacher"],
                             "--colocate"]
    c = validate(build_config(_parse(argv)), cuda_available=True)
    assert c.plan.teacher == "megatron" and "--colocate: ignored" in capsys.readouterr().err


def test_a_model_flag_that_disagrees_with_the_hf_config_is_an_error(paths):
    argv = _common(paths) + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", paths["teacher"]]
    argv[argv.index("--num-layers") + 1] = "28"
    with pytest.raises(ConfigError, match=r"--num-layers 28 but .*config.json has num_hidden_layers = 36"):
        _parse(argv)
    with pytest.raises(ConfigError, match="--add-qkv-bias says q/k/v biases"):
        _parse(_common(paths) + ["--add-qkv-bias"])


@pytest.mark.parametrize("flag, value", [("--pipeline-model-parallel-size", "2"), ("--hidden-dropout", "0.1"),
                                         ("--optimizer", "sgd")])
def test_flags_that_would_change_what_runs_are_refused(paths, flag, value):
    with pytest.raises(ConfigError, match=f"{flag} {value}: opd-train supports only {flag}"):
        _parse(["--hf-checkpoint", paths["model"], flag, value])


def test_low_var_kl_is_k3_clamped():
    import torch

    from opd_train.algo import policy_loss
    new = torch.tensor([[0.0, -30.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -0.7]])
    _, m = policy_loss(new, new.detach(), torch.zeros(1, 3), torch.ones(1, 3), ref_logprobs=ref,
                       ref_kl="low_var_kl", ref_kl_coef=0.1)
    d = ref - new.detach()
    k3 = (torch.exp(d) - 1 - d).clamp(-10, 10)
    assert float(m["ref_kl"]) == pytest.approx(float(k3.mean()))
    assert float(k3[0, 1]) == 10.0                        # exp(29) clamped


def test_parameter_name_lists(paths, tmp_path):
    """slime's --only-train-params-name-list / --freeze-params-name-list: lists of regexes, from the command line or
    YAML (a single string is a list of one); a pattern that is not a regular expression is refused before anything
    starts (one that matches no parameter is refused by the trainer, which knows the names)."""
    base = _common(paths) + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", paths["teacher"]]
    c = validate(build_config(_parse(base + ["--freeze-params-name-list", "embedding", "output_layer",
                                             "--only-train-params-name-list", r"decoder\.layers\.2[0-3]\."])),
                 cuda_available=True)
    assert c.train.freeze_params_name_list == ("embedding", "output_layer")
    assert c.train.only_train_params_name_list == (r"decoder\.layers\.2[0-3]\.",)
    yaml_file = tmp_path / "freeze.yaml"
    yaml_file.write_text("freeze_params_name_list: embedding\n")
    assert build_config(_parse(base + ["--config", str(yaml_file)])).train.freeze_params_name_list == ("embedding",)
    with pytest.raises(ConfigError, match=r"--freeze-params-name-list 'layers\.\(' is not a regular expression"):
        validate(build_config(_parse(base + ["--freeze-params-name-list", "layers.("])), cuda_available=True)
    with pytest.raises(ConfigError, match="--freeze-params-name-list takes one or more strings"):
        build_config({"freeze_params_name_list": [1]})
