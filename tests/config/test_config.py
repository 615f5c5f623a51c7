"""Config: flags, YAML merge, the slime-compatible args view, and every invalid combination of SPEC section 2.

Each invalid combination must give exactly one clear message before anything starts (no Ray, no server, no model).
"""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest

from opd_train import cli
from opd_train.config import (MAX_FULL_KL_HTTP_VOCAB, ConfigError, build_config, explicit_values, load_yaml,
                              validate)

SLIME_FLAGS = ["--use-opd", "--opd-type", "--opd-kl-coef", "--opd-teacher-load", "--opd-teacher-ckpt-step",
               "--advantage-estimator", "--custom-rm-path", "--custom-reward-post-process-path", "--rm-url",
               "--n-samples-per-prompt", "--rollout-batch-size", "--global-batch-size", "--num-rollout",
               "--rollout-temperature", "--rollout-max-response-len", "--normalize-advantages", "--load", "--save",
               "--hf-checkpoint", "--prompt-data", "--input-key", "--label-key", "--apply-chat-template",
               "--ray-address", "--config", "--opd-kl-mode", "--opd-kl-estimator", "--eval-interval", "--output-dir"]


def write_model_dir(path, vocab=16, tokenizer_vocab=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3", "vocab_size": vocab}, f)
    if tokenizer_vocab is not None:
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump({"model": {"vocab": tokenizer_vocab}}, f)
    return str(path)


@pytest.fixture
def env(tmp_path):
    student = write_model_dir(tmp_path / "student", tokenizer_vocab={"a": 0, "b": 1})
    teacher_ckpt = tmp_path / "teacher_dist"
    write_model_dir(teacher_ckpt / "iter_0000003" / "hf", tokenizer_vocab={"a": 0, "b": 1})
    (teacher_ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "1+1=", "label": "2"}\n')
    base = ["--hf-checkpoint", student, "--prompt-data", str(prompts), "--output-dir", str(tmp_path / "out")]
    return {"tmp": tmp_path, "student": student, "teacher": str(teacher_ckpt), "prompts": str(prompts), "base": base}


def parse(argv):
    return build_config(explicit_values(cli.build_parser().parse_args(argv)))


def check(argv, **kw):
    return validate(parse(argv), cuda_available=kw.pop("cuda", False), **kw)


SGLANG = ["--use-opd", "--opd-type", "sglang", "--rm-url", "http://127.0.0.1:30000/generate"]


def test_help_lists_every_slime_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    missing = [f for f in SLIME_FLAGS if f not in text]
    assert not missing, f"--help does not document {missing}"
    assert "serve" in text and "convert" in text


def test_defaults_and_args_view(env):
    c = check(env["base"] + SGLANG)
    args = c.args
    assert (args.use_opd, args.opd_type, args.opd_kl_coef, args.advantage_estimator) == (True, "sglang", 1.0, "grpo")
    assert args.rm_url == "http://127.0.0.1:30000/generate"
    assert args.n_samples_per_prompt == 4 and args.rollout_temperature == 1.0
    assert args.vocab_size == 16                            # derived from the student's config.json
    with pytest.raises(AttributeError, match="frozen"):
        args.rm_url = "x"
    with pytest.raises(AttributeError, match="no attribute 'not_a_flag'"):
        args.not_a_flag
    clone = pickle.loads(pickle.dumps(args))               # crosses process boundaries (Ray)
    assert clone.rm_url == args.rm_url and clone.vocab_size == 16
    full = check(env["base"] + SGLANG + ["--opd-kl-mode", "full"])
    assert full.args.opd_teacher_topk == 16                # the full teacher distribution is fetched


def test_boolean_flags(env):
    c = check(env["base"] + ["--rm-type", "exact_match", "--no-progress", "--no-tensorboard", "--no-load-optim",
                             "--normalize-advantages", "--no-experiment-baseline"])
    assert c.log.no_progress and c.log.no_tensorboard and c.checkpoint.no_load_optim and c.algo.normalize_advantages
    assert not c.experiment.experiment_baseline
    d = check(env["base"] + ["--rm-type", "exact_match"])
    assert not d.log.no_progress and not d.checkpoint.no_load_optim and d.experiment.experiment_baseline


def test_paths_become_absolute(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])
    c = check(["--hf-checkpoint", "student", "--prompt-data", "train.jsonl", "--rm-type", "exact_match"])
    assert c.model.hf_checkpoint == env["student"] and os.path.isabs(c.log.output_dir)


def test_yaml_merge_flags_win(env):
    cfg = env["tmp"] / "run.yaml"
    cfg.write_text("opd:\n  use-opd: true\n  opd_kl_coef: 0.5\nrollout_batch_size: 8\nlr: 1e-4\n"
                   "opd_type: sglang\nrm_url: http://127.0.0.1:1/generate\n")
    c = check(env["base"] + ["--config", str(cfg), "--opd-kl-coef", "2"])
    assert c.opd.use_opd and c.opd.opd_kl_coef == 2.0 and c.rollout.rollout_batch_size == 8 and c.train.lr == 1e-4


@pytest.mark.parametrize("text, message", [
    ("rolout_batch_size: 3\n", "unknown config key 'rolout_batch_size'; did you mean 'rollout_batch_size'?"),
    ("opd:\n  lr: 1.0\n", "unknown config key 'lr'; did you mean 'lr'? (in section 'opd')"),
    ("- 1\n", "expected a mapping of flag names to values"),
    ("rollout_batch_size: many\n", "--rollout-batch-size must be of type int, got 'many'"),
])
def test_yaml_errors(env, text, message):
    cfg = env["tmp"] / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(env["base"] + ["--config", str(cfg)])


def test_missing_yaml(env):
    with pytest.raises(ConfigError, match=re.escape("--config '/nope.yaml': file not found")):
        load_yaml("/nope.yaml")


# Every invalid combination: (extra argv, exact message). ``{teacher}`` / ``{student}`` are filled in per test.
INVALID = [
    # SPEC section 2: the OPD flags
    (["--use-opd"], "--use-opd needs --opd-type: sglang (teacher on an HTTP server, with --rm-url) or megatron "
                    "(teacher checkpoint in the trainer, with --opd-teacher-load)"),
    (["--opd-type", "sglang", "--rm-type", "exact_match"], "--opd-type is set but --use-opd is not; add --use-opd or "
                                                           "drop --opd-type"),
    (["--opd-teacher-load", "{teacher}", "--rm-type", "exact_match"],
     "--opd-teacher-load is set but --use-opd is not; add --use-opd or drop --opd-teacher-load"),
    (["--opd-teacher-ckpt-step", "3", "--rm-type", "exact_match"],
     "--opd-teacher-ckpt-step is set but --use-opd is not; add --use-opd or drop --opd-teacher-ckpt-step"),
    (SGLANG + ["--opd-kl-coef", "-1"], "--opd-kl-coef must be a finite number >= 0, got -1.0"),
    (SGLANG + ["--opd-kl-coef", "nan"], "--opd-kl-coef must be a finite number >= 0, got nan"),
    (SGLANG + ["--opd-kl-coef", "inf"], "--opd-kl-coef must be a finite number >= 0, got inf"),
    (["--use-opd", "--opd-type", "megatron"], "--opd-type megatron needs --opd-teacher-load DIR (the teacher's "
                                              "torch_dist checkpoint; make one with `opd-train convert hf2dist "
                                              "HF_DIR OUT_DIR`)"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "/does/not/exist"],
     "--opd-teacher-load '/does/not/exist' does not exist; pass the teacher checkpoint directory"),
    (SGLANG + ["--opd-teacher-load", "{teacher}"],
     "--opd-teacher-load is for --opd-type megatron; in sglang mode the teacher is the server at --rm-url"),
    (SGLANG + ["--opd-teacher-ckpt-step", "3"],
     "--opd-teacher-ckpt-step is for --opd-type megatron (the teacher checkpoint loaded by the trainer)"),
    (SGLANG + ["--offload-teacher"], "--offload-teacher is for --opd-type megatron (the SGLang teacher is not in "
                                     "the trainer)"),
    (["--use-opd", "--opd-type", "sglang"], "--opd-type sglang needs the teacher URL: --rm-url "
                                            "http://HOST:PORT/generate (start the teacher with `python -m "
                                            "sglang.launch_server` on GPU or `opd-train serve --model DIR` on CPU)"),
    (["--use-opd", "--opd-type", "sglang", "--rm-url", "localhost:30000"],
     "--rm-url 'localhost:30000' must look like http://HOST:PORT/generate"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--rm-url", "http://h:1/generate"],
     "--rm-url is the SGLang teacher endpoint; with --opd-type megatron the teacher runs in the trainer: drop --rm-url "
     "(or use --opd-type sglang)"),
    (["--rm-url", "http://h:1/generate", "--rm-type", "exact_match"],
     "--rm-url is the SGLang teacher endpoint of OPD; add --use-opd --opd-type sglang or drop --rm-url"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--opd-teacher-ckpt-step", "7"],
     "--opd-teacher-ckpt-step 7: {teacher}/iter_0000007 does not exist; available: iter_0000003"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--opd-teacher-ckpt-step", "-2"],
     "--opd-teacher-ckpt-step must be >= 0, got -2"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--custom-rm-path",
      "opd_train.rollout.on_policy_distillation.reward_func"],
     "--custom-rm-path opd_train.rollout.on_policy_distillation.reward_func scores an SGLang teacher; with "
     "--opd-type megatron drop it (the trainer scores the teacher)"),
    (SGLANG + ["--custom-rm-path", "opd_train.rollout.rewards.exact_match"],
     "--custom-rm-path 'opd_train.rollout.rewards.exact_match': in sglang mode the teacher is scored by "
     "opd_train.rollout.on_policy_distillation.reward_func; keep it (or drop --custom-rm-path) and pass your task "
     "reward as --opd-task-rm-path"),
    (SGLANG + ["--custom-reward-post-process-path", "opd_train.rollout.rewards.exact_match"],
     "--custom-reward-post-process-path 'opd_train.rollout.rewards.exact_match': in sglang mode use "
     "opd_train.rollout.on_policy_distillation.post_process_rewards (or drop the flag)"),
    (SGLANG + ["--opd-kl-mode", "topk", "--opd-teacher-topk", "4", "--rollout-temperature", "0.7"],
     "--rollout-temperature 0.7 with --opd-kl-mode topk: an SGLang teacher returns log-probs at T=1 only, and a "
     "truncated top-k cannot be rescaled to T exactly; roll out at temperature 1"),
    (SGLANG + ["--opd-kl-mode", "full", "--opd-kl-estimator", "k3"],
     "--opd-kl-estimator selects the sampled-token estimator; with --opd-kl-mode full the KL is computed from the "
     "teacher's distribution: drop one of them"),
    (SGLANG + ["--opd-kl-mode", "topk"],
     "--opd-kl-mode topk needs --opd-teacher-topk K (teacher log-probs per response position, e.g. 64)"),
    (SGLANG + ["--opd-teacher-topk", "4"],
     "--opd-teacher-topk is the K of --opd-kl-mode topk; add --opd-kl-mode topk or drop it"),
    (SGLANG + ["--opd-kl-mode", "topk", "--opd-teacher-topk", "16"],
     "--opd-teacher-topk 16 must be >= 1 and below the vocabulary size 16 (use --opd-kl-mode full for the whole "
     "distribution)"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--opd-kl-mode", "topk",
      "--opd-teacher-topk", "4"],
     "--opd-kl-mode topk is for an SGLang teacher; the Megatron teacher's logits are in the trainer: use "
     "--opd-kl-mode full (the exact KL) or sampled"),
    (SGLANG + ["--opd-task-rm-path", "opd_train.rollout.rewards.math_reward", "--rm-type", "math"],
     "--opd-task-rm-path and --rm-type both name the task reward; keep one"),
    (["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", "{teacher}", "--opd-task-rm-path",
      "opd_train.rollout.rewards.math_reward"],
     "--opd-task-rm-path is for sglang mode; with --opd-type megatron pass the task reward as --rm-type or "
     "--custom-rm-path"),
    # rewards
    ([], "no training signal: pass a task reward (--rm-type exact_match|math or --custom-rm-path) and/or --use-opd "
         "with a teacher"),
    (["--custom-rm-path", "exact_match"], "--custom-rm-path 'exact_match' must be a dotted path module.function (e.g. "
                                          "my_pkg.rewards.score)"),
    (["--custom-rm-path", "no_such_module_xyz.fn"],
     "--custom-rm-path 'no_such_module_xyz.fn' cannot be imported (No module named 'no_such_module_xyz'); make the "
     "module importable (PYTHONPATH) or fix the path"),
    (["--custom-rm-path", "opd_train.rollout.rewards.BUILTIN"], "--custom-rm-path 'opd_train.rollout.rewards.BUILTIN' "
                                                                "is not callable"),
    (["--custom-rm-path", "opd_train.rollout.rewards.exact_match", "--rm-type", "math"],
     "--custom-rm-path and --rm-type both choose the reward; keep one"),
    # batches and estimators
    (["--rm-type", "exact_match", "--n-samples-per-prompt", "1"],
     "--advantage-estimator grpo normalises within a group of samples of one prompt: use --n-samples-per-prompt >= 2"),
    (["--rm-type", "exact_match", "--global-batch-size", "48"],
     "--global-batch-size 48 must divide rollout_batch_size * n_samples_per_prompt = 128 (the rollout is split into "
     "whole optimizer steps)"),
    (["--rm-type", "exact_match", "--actor-num-gpus-per-node", "3", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size 2 must divide the trainer world size 3 (--actor-num-nodes x "
     "--actor-num-gpus-per-node)"),
    (["--rm-type", "exact_match", "--actor-num-gpus-per-node", "3", "--global-batch-size", "64"],
     "--global-batch-size 64 must be divisible by the data-parallel size 3"),
    (["--rm-type", "exact_match", "--rollout-batch-size", "0"], "--rollout-batch-size must be >= 1, got 0"),
    (["--rm-type", "exact_match", "--num-rollout", "0"], "--num-rollout must be >= 1, got 0"),
    (["--rm-type", "exact_match", "--rollout-max-response-len", "0"], "--rollout-max-response-len must be >= 1, got 0"),
    (["--rm-type", "exact_match", "--fused-linear-chunk-tokens", "0"],
     "--fused-linear-chunk-tokens must be >= 1 (or left out for the 64 MiB default), got 0"),
    (["--rm-type", "exact_match", "--trainer-threads", "0"],
     "--trainer-threads must be >= 1 (or left out for the default), got 0"),
    (["--rm-type", "exact_match", "--rollout-temperature", "0"],
     "--rollout-temperature must be > 0 for training rollouts (log-probs of logits / T), got 0.0"),
    (["--rm-type", "exact_match", "--rollout-top-p", "0"],
     "--rollout-top-p must be in (0, 1] and --rollout-top-k -1 (off) or >= 1"),
    (["--rm-type", "exact_match", "--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--rm-type", "exact_match", "--lr", "0"], "--lr must be > 0"),
    (["--rm-type", "exact_match", "--gamma", "1.5"], "--gamma and --lambd must be in [0, 1]"),
    (["--rm-type", "exact_match", "--eps-clip-c", "0.5"], "--eps-clip-c (dual clip) must be > 1, got 0.5"),
    (["--rm-type", "exact_match", "--kl-loss-coef", "0.1"], "--kl-loss-coef is set but --use-kl-loss is not; add "
                                                            "--use-kl-loss"),
    (["--rm-type", "exact_match", "--kl-coef", "0.1"],
     "--kl-coef is a reward penalty of ppo / reinforce_plus_plus*; grpo has no token rewards: use --use-kl-loss "
     "--kl-loss-coef instead"),
    (["--rm-type", "exact_match", "--critic-lr", "1e-5"], "--critic-lr is only used by --advantage-estimator ppo "
                                                          "(the critic)"),
    (["--rm-type", "exact_match", "--eval-interval", "5"], "--eval-interval needs --eval-prompt-data (the held-out "
                                                           "prompts)"),
    (["--rm-type", "exact_match", "--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    # paths, devices, cluster
    (["--rm-type", "exact_match", "--save-interval", "5"], "--save-interval needs --save DIR and must be >= 1"),
    (["--rm-type", "exact_match", "--ref-load", "/does/not/exist"], "--ref-load '/does/not/exist' does not exist"),
    (["--rm-type", "exact_match", "--critic-load", "{student}"], "--critic-load is only used by --advantage-estimator "
                                                                 "ppo"),
    (["--rm-type", "exact_match", "--device", "cuda"],
     "--device cuda but no CUDA device is visible here; use --device cpu (or auto), or --ray-address of a cluster "
     "with GPUs"),
    (["--rm-type", "exact_match", "--rollout-engine", "sglang"],
     "--rollout-engine sglang needs GPUs (SGLang has no CPU build here); use --rollout-engine cpu or auto"),
    (["--rm-type", "exact_match", "--ray-address", "not an address"],
     "--ray-address 'not an address': use auto, HOST:PORT or ray://HOST:PORT"),
]


@pytest.mark.parametrize("extra, message", INVALID, ids=[m[:60] for _, m in INVALID])
def test_invalid_combination(env, extra, message):
    extra = [a.format(teacher=env["teacher"], student=env["student"]) for a in extra]
    message = message.format(teacher=env["teacher"], student=env["student"])
    with pytest.raises(ConfigError) as exc:
        check(env["base"] + extra)
    assert str(exc.value) == message


def test_prompt_and_model_paths(env, tmp_path):
    cases = [
        (["--hf-checkpoint", str(tmp_path), "--prompt-data", env["prompts"], "--rm-type", "exact_match"],
         f"--hf-checkpoint {str(tmp_path)!r} is not a HF model directory (no config.json)"),
        (["--hf-checkpoint", env["student"], "--prompt-data", "/nope.jsonl", "--rm-type", "exact_match"],
         "--prompt-data '/nope.jsonl': file not found"),
        (["--hf-checkpoint", env["student"], "--prompt-data", env["student"] + "/config.json", "--rm-type",
          "exact_match", "--eval-prompt-data", env["prompts"] + ".csv"],
         f"--eval-prompt-data {env['prompts'] + '.csv'!r}: file not found"),
        (["--hf-checkpoint", env["student"], "--rm-type", "exact_match"],
         "--hf-checkpoint needs --prompt-data (the training prompts)"),
        (env["base"] + ["--eval-prompt-data", env["prompts"], "--use-opd", "--opd-type", "megatron",
                        "--opd-teacher-load", env["teacher"]],
         "--eval-prompt-data needs a reward to score pass@1: set --eval-rm-type (or --rm-type)"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as exc:
            check(argv)
        assert str(exc.value) == message


def test_teacher_vocab_and_tokenizer_must_match(env, tmp_path):
    other = tmp_path / "t2"
    write_model_dir(other / "iter_0000001" / "hf", vocab=32)
    (other / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(ConfigError, match=r"the teacher's vocab_size \(32, .*\) differs from the student's \(16, .*"
                                          r"has no tokenizer.json"):
        check(env["base"] + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(other)])
    padded = tmp_path / "padded"          # the same tokenizer, a larger (padded) embedding: accepted
    write_model_dir(padded, vocab=32, tokenizer_vocab={"a": 0, "b": 1})
    check(env["base"] + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(padded)])
    small = tmp_path / "small"
    write_model_dir(small, vocab=8, tokenizer_vocab={"a": 0, "b": 1})
    with pytest.raises(ConfigError, match="the teacher has 8 vocabulary rows but the student 16"):
        check(env["base"] + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(small)])
    swapped = tmp_path / "t3"
    write_model_dir(swapped, tokenizer_vocab={"a": 1, "b": 0})
    with pytest.raises(ConfigError, match="maps tokens differently from the student's"):
        check(env["base"] + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(swapped)])
    ok = check(env["base"] + ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", env["teacher"]])
    assert ok.opd.opd_teacher_load == env["teacher"]


def test_full_kl_over_http_refuses_large_vocab(env, tmp_path):
    big = write_model_dir(tmp_path / "big", vocab=MAX_FULL_KL_HTTP_VOCAB + 1)
    base = ["--hf-checkpoint", big, "--prompt-data", env["prompts"]] + SGLANG
    for extra, why in ((["--opd-kl-mode", "full"], "--opd-kl-mode full fetches"),
                       (["--rollout-temperature", "0.7"], "--rollout-temperature 0.7 needs the teacher log-probs at T, "
                                                          "i.e. fetching")):
        with pytest.raises(ConfigError, match=re.escape(
                f"{why} the teacher's full distribution over HTTP (top_logprobs_num = vocab size = "
                f"{MAX_FULL_KL_HTTP_VOCAB + 1}); above {MAX_FULL_KL_HTTP_VOCAB} that is too large: use --opd-kl-mode "
                "topk --opd-teacher-topk K")):
            check(base + extra)
    assert check(base).plan.teacher_topk == 0                               # sampled mode at T = 1 is fine
    assert check(base + ["--opd-kl-mode", "topk", "--opd-teacher-topk", "64"]).plan.teacher_topk == 64


def test_the_opd_plan_is_decided_once(env):
    """Every mode of the matrix resolves into one plan: the KL kind, where it acts, what the teacher sends."""
    megatron = ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", env["teacher"]]
    cases = [(SGLANG, ("sglang", "k1", 0, True)),
             (SGLANG + ["--opd-kl-estimator", "k3"], ("sglang", "k3", 0, True)),
             (SGLANG + ["--rollout-temperature", "0.7"], ("sglang", "k1", 16, True)),   # full dist, rescaled to T
             (SGLANG + ["--opd-kl-mode", "full"], ("sglang", "full", 16, False)),
             (SGLANG + ["--opd-kl-mode", "topk", "--opd-teacher-topk", "5"], ("sglang", "topk", 5, False)),
             (megatron, ("megatron", "k1", 0, True)),
             (megatron + ["--opd-kl-mode", "full", "--rollout-temperature", "0.7"], ("megatron", "full", 0, False))]
    for extra, (teacher, kl, topk, sampled) in cases:
        p = check(env["base"] + extra + ["--opd-kl-coef", "0.5"]).plan
        assert (p.teacher, p.kl, p.teacher_topk, p.sampled) == (teacher, kl, topk, sampled), extra
        assert (p.advantage_coef, p.loss_coef) == ((0.5, 0.0) if sampled else (0.0, 0.5))
    assert check(env["base"] + ["--rm-type", "exact_match"]).plan is None


def test_cli_reports_errors_before_anything_starts(env, monkeypatch, capsys):
    """The CLI exits with status 2 and the message; no Ray, no runtime, no experiment is started."""
    import opd_train.orchestration.runtime as runtime
    import opd_train.toy.experiment as experiment

    def boom(*a, **k):
        raise AssertionError("something was started despite an invalid flag")
    monkeypatch.setattr(runtime.Runtime, "start", boom)
    monkeypatch.setattr(experiment, "build_sft_model", boom)
    monkeypatch.setattr(experiment, "launch_cpu_engine", boom, raising=False)
    monkeypatch.setattr(experiment, "start_ray", boom)
    monkeypatch.setattr(runtime, "start_ray", boom)
    for argv in (env["base"] + ["--use-opd"], ["--opd-type", "sglang", "--opd-teacher-ckpt-step", "3"],
                 ["--opd-kl-coef", "-3"], ["--opd-kl-mode", "topk"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "opd-train: error: " in capsys.readouterr().err


def test_an_unwarmed_high_learning_rate_gets_a_notice():
    from opd_train.config import build_config, notices
    assert any("--lr-warmup-iters" in n for n in notices(build_config({"lr": 1e-3})))
    assert not notices(build_config({"lr": 1e-3, "lr_warmup_iters": 20}))
    assert not notices(build_config({}))                      # slime's default lr 1e-6


def test_fused_output_layer_flags_reach_the_trainer_settings(env):
    """--no-fused-output-layer / --fused-linear-chunk-tokens are read once and land in BatchingSettings."""
    from opd_train.orchestration.settings import trainer_settings
    base = env["base"] + ["--rm-type", "exact_match"]
    default = trainer_settings(check(base), "/tmp/save").batching
    assert default.fused_output_layer is True and default.fused_linear_chunk_tokens is None
    chosen = trainer_settings(check(base + ["--no-fused-output-layer", "--fused-linear-chunk-tokens", "64"]),
                              "/tmp/save").batching
    assert chosen.fused_output_layer is False and chosen.fused_linear_chunk_tokens == 64


def test_trainer_threads_default_to_the_cores_shared_by_the_cpu_ranks_of_a_real_model(monkeypatch):
    """Ray gives an actor of one CPU OMP_NUM_THREADS=1; a CPU rank of a 20M+ parameter model gets cores / ranks."""
    import os

    from opd_train import hf
    from opd_train.config import build_config
    from opd_train.orchestration.cluster import Placement, trainer_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    cpu = lambda n: Placement(device="cpu", trainer_bundles=[{"CPU": 1}] * n)  # noqa: E731
    cluster = build_config({}).cluster
    smollm2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    big = hf.approx_params(smollm2)
    assert 130e6 < big < 140e6                                       # SmolLM2-135M
    assert trainer_threads(cluster, cpu(1), big) == 6 and trainer_threads(cluster, cpu(4), big) == 1
    assert trainer_threads(cluster, cpu(1), 133_504) is None         # the toy: one thread is faster
    assert trainer_threads(cluster, Placement(device="cuda", trainer_bundles=[{"CPU": 1, "GPU": 1}]), big) is None
    assert trainer_threads(build_config({"trainer_threads": 3}).cluster, cpu(2), 133_504) == 3
