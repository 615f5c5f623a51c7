"""The slime-compatible SGLang-mode OPD hooks against our CPU engine serving the fixture teacher."""
from __future__ import annotations

import asyncio
import importlib
import pathlib
from types import SimpleNamespace

import pytest
import torch

from opd_train.rollout import on_policy_distillation as opd
from opd_train.types import Sample, Status
from loopback import LoopbackServer, Reply

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"
PROMPTS = [[101, 7, 333, 58], [45, 812, 9], [17, 250, 3, 999, 42, 512]]


@pytest.fixture(scope="module")
def teacher_server():
    from opd_train.serving import ServerConfig, start_in_thread
    handle = start_in_thread(ServerConfig(model_path=str(FIXTURES / "model"), port=0, num_threads=1))
    yield handle
    handle.stop()
    opd.close_teachers()


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(FIXTURES / "model"), dtype=torch.float32).eval()


def make_samples(n_per_prompt: int = 2, response_len: int = 5) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, prompt in enumerate(PROMPTS):
        for j in range(n_per_prompt):
            resp = torch.randint(0, 1000, (response_len + j,), generator=g).tolist()
            samples.append(Sample(index=len(samples), group_index=i, tokens=prompt + resp,
                                  response_length=len(resp), status=Status.COMPLETED, label=str(i)))
    return samples


def args_for(url: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{"rm_url": f"{url}/generate", "vocab_size": 1000, "rollout_temperature": 1.0,
                              "opd_teacher_backoff": 0.01, **kw})


def hf_response_logprobs(hf, sample: Sample, temperature: float = 1.0) -> torch.Tensor:
    with torch.inference_mode():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([sample.tokens])).logits[0].double() / temperature, -1)
    p = sample.prompt_length
    return torch.tensor([lp[p - 1 + r, sample.tokens[p + r]].item() for r in range(sample.response_length)])


def test_dotted_entry_points_resolve():
    for path in ("opd_train.rollout.on_policy_distillation.reward_func",
                 "opd_train.rollout.on_policy_distillation.post_process_rewards"):
        module, name = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))


def test_reward_func_per_sample_concurrently(teacher_server, hf):
    args = args_for(teacher_server.url)
    samples = make_samples(n_per_prompt=22)                   # 66 samples scored concurrently
    before = teacher_server.state.scheduler.stats.batches

    async def rollout():
        return await asyncio.gather(*(opd.reward_func(args, s) for s in samples))

    rewards = asyncio.run(rollout())
    for s, r in zip(samples, rewards):
        assert s.teacher_logprobs.dtype == torch.float32 and s.teacher_logprobs.shape == (s.response_length,)
        assert (s.teacher_logprobs.double() - hf_response_logprobs(hf, s)).abs().max() <= 1e-5
        assert r["reward"] == 0.0 and r["task_reward"] is None
        assert r["teacher_logprob_mean"] == pytest.approx(float(s.teacher_logprobs.mean()))
        assert s.metadata["teacher_temperature"] == 1.0
    assert teacher_server.state.scheduler.stats.batches - before < len(samples)   # the engine batched them
    s = samples[0]
    s.reward = rewards[0]
    raw, shaped = opd.post_process_rewards(args, samples[:1])
    assert raw == shaped == [0.0]


def exact_match(args, sample):
    return float(sample.label == "1")


async def async_dict_reward(args, sample):
    await asyncio.sleep(0)
    return {"acc": float(sample.label == "2"), "other": 5.0}


@pytest.mark.parametrize("path, key, expected", [
    (f"{__name__}.exact_match", None, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
    (f"{__name__}.async_dict_reward", "acc", [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
])
def test_task_reward_combined_with_opd(teacher_server, path, key, expected):
    args = args_for(teacher_server.url, opd_task_rm_path=path, reward_key=key)
    samples = make_samples()
    for s in samples:
        s.reward = asyncio.run(opd.reward_func(args, s))
        assert s.teacher_logprobs is not None
    raw, rewards = opd.post_process_rewards(args, samples)
    assert raw == rewards == expected


def test_post_process_scores_missing_samples_in_one_batch(teacher_server, hf):
    args = args_for(teacher_server.url, opd_task_rm_path=f"{__name__}.exact_match")
    samples = make_samples()
    samples[-1].status = Status.ABORTED
    before = teacher_server.state.scheduler.stats.scored_seqs, teacher_server.state.scheduler.stats.batches
    raw, rewards = opd.post_process_rewards(args, samples)
    stats = teacher_server.state.scheduler.stats
    assert stats.scored_seqs - before[0] == len(samples) - 1 and stats.batches - before[1] == 1
    assert raw == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert samples[-1].teacher_logprobs is None                 # aborted: not scored, reward 0
    for s in samples[:-1]:
        assert (s.teacher_logprobs.double() - hf_response_logprobs(hf, s)).abs().max() <= 1e-5


def test_misaligned_teacher_span_is_refused():
    """A span of the wrong length never reaches the kernels: the trainer's input check names the sample."""
    from opd_train.backends.megatron import OPDSettings, TeacherRows, TrainBatch
    samples = make_samples()
    rows = [torch.zeros(s.response_length) for s in samples]
    rows[3] = torch.zeros(samples[3].response_length - 1)
    with pytest.raises(ValueError, match=r"TeacherRows.logprobs\[3\] has shape \(\d+,\); the sample has \d+ "
                                         "response tokens"):
        TeacherRows(logprobs=rows).check(TrainBatch.from_samples(samples), OPDSettings())


def test_full_distribution_at_rollout_temperature(teacher_server, hf):
    args = args_for(teacher_server.url, rollout_temperature=0.8, opd_teacher_topk=-1)
    s = make_samples()[0]
    asyncio.run(opd.reward_func(args, s))
    assert s.teacher_topk_ids.shape == (s.response_length, 1000) and s.metadata["teacher_temperature"] == 0.8
    assert (s.teacher_logprobs.double() - hf_response_logprobs(hf, s, 0.8)).abs().max() <= 1e-5


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="--rm-url"):
        opd.get_teacher(SimpleNamespace())
    with pytest.raises(ValueError, match="T=1 teacher"):
        opd.get_teacher(SimpleNamespace(rm_url="http://127.0.0.1:1/generate", rollout_temperature=0.7,
                                        vocab_size=1000))
    with pytest.raises(ValueError, match="needs args.vocab_size"):
        opd.get_teacher(SimpleNamespace(rm_url="http://127.0.0.1:1/generate", opd_teacher_topk=-1))
    with pytest.raises(ValueError, match="cannot import the task reward"):
        asyncio.run(opd._task_reward(SimpleNamespace(opd_task_rm_path="no_such_module.fn"), Sample()))


def test_one_shared_client_per_settings():
    a = SimpleNamespace(rm_url="http://127.0.0.1:1/generate", vocab_size=10)
    assert opd.get_teacher(a) is opd.get_teacher(SimpleNamespace(**vars(a)))
    assert opd.get_teacher(a) is not opd.get_teacher(SimpleNamespace(**vars(a), opd_teacher_timeout=5.0))


def test_dead_teacher_fails_with_the_url():
    with LoopbackServer(default=Reply(503, b"down", content_type="text/plain")) as srv:
        args = SimpleNamespace(rm_url=f"{srv.url}/generate", vocab_size=1000, opd_teacher_max_retries=2,
                               opd_teacher_backoff=0.01)
        with pytest.raises(Exception, match=f"{srv.url}/generate failed after 3 attempt"):
            asyncio.run(opd.reward_func(args, make_samples()[0]))
        assert srv.count("/generate") == 3
