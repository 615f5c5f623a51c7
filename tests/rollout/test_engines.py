"""SGLangEngine on our CPU engine (in-process and as a managed subprocess), and the SGLang launcher."""
from __future__ import annotations

import asyncio
import os
import pathlib

import pytest
import torch

from opd_train.rollout.engines import (ManagedServer, SamplingParams, SGLangEngine, is_sglang_available,
                                       launch_cpu_engine, launch_sglang_server)
from opd_train.teacher import SGLangTeacher, SGLangTeacherConfig

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"
MODEL_V1, MODEL_V2 = str(FIXTURES / "model"), str(FIXTURES / "model_v2")
P1, P2 = [101, 7, 333, 58, 920, 14, 66, 2], [45, 812, 9, 300, 77, 18]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM
    return {v: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
            for v, p in (("v1", MODEL_V1), ("v2", MODEL_V2))}


def _ref_scores(model, ids):
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    return torch.tensor([lp[j, ids[j + 1]].item() for j in range(len(ids) - 1)])


@pytest.fixture(scope="module")
def managed():
    """Our CPU engine as a real subprocess, the way the driver starts a teacher / rollout server."""
    server = launch_cpu_engine(MODEL_V1, num_threads=1, health_timeout=180)
    yield server
    server.stop()


def test_managed_cpu_engine_end_to_end(managed, hf):
    eng = SGLangEngine(url=managed.url, vocab_size=1000)
    assert eng.health() and eng.health(generate=True)
    groups = eng.generate([P1, P2], SamplingParams(max_new_tokens=5, temperature=1.0, seed=3), n=4)
    assert [len(g) for g in groups] == [4, 4]
    for prompt, group in zip([P1, P2], groups):
        for gen in group:
            assert gen.prompt_ids == prompt and len(gen.output_ids) == 5 == len(gen.output_logprobs)
            assert gen.finish_reason == "length" and gen.weight_version == "default"
            full = prompt + gen.output_ids
            ref = _ref_scores(hf["v1"], full)[len(prompt) - 1:]
            assert (torch.tensor(gen.output_logprobs) - ref).abs().max() <= 1e-5
    teacher = SGLangTeacher(SGLangTeacherConfig(url=managed.url, vocab_size=1000, top_logprobs_num=2))
    whole = asyncio.run(teacher.ascore(P1, len(P1) - 1))                       # scoring goes through the one client
    assert (whole.logprobs - _ref_scores(hf["v1"], P1)).abs().max() <= 1e-5
    tail = asyncio.run(teacher.ascore(P2 + [5, 6], len(P2) + 2 - 4))
    assert (tail.logprobs - _ref_scores(hf["v1"], P2 + [5, 6])[3:]).abs().max() <= 1e-5
    assert tail.topk_ids.shape == (len(P2) + 2 - 4, 2)
    eng.update_weights_from_disk(MODEL_V2, weight_version="step-1")
    after = asyncio.run(teacher.ascore(P1, len(P1) - 1))
    assert (after.logprobs - _ref_scores(hf["v2"], P1)).abs().max() <= 1e-5
    teacher.close()
    assert eng.generate([P1], SamplingParams(max_new_tokens=1))[0][0].weight_version == "step-1"
    eng.flush_cache()
    eng.pause()
    eng.resume()
    assert eng.health(generate=True)
    eng.http.close()


def test_managed_server_stops_cleanly():
    server = launch_cpu_engine(MODEL_V1, num_threads=1, health_timeout=180)
    pid, url = server.process.pid, server.url
    assert server.alive() and SGLangEngine(url=url).health()
    code = server.stop()
    assert not server.alive() and code is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                                   # the whole process group is gone
    assert not SGLangEngine(url=url).health()
    assert server.stop() == code                            # idempotent


def test_a_server_that_dies_at_start_fails_fast_with_its_log(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')     # a broken model directory
    with pytest.raises(RuntimeError, match="exited with code") as info:
        launch_cpu_engine(str(tmp_path), health_timeout=120, log_path=str(tmp_path / "engine.log"))
    assert "engine.log" in str(info.value) and "last lines" in str(info.value)


def test_health_timeout_kills_the_process(tmp_path):
    script = tmp_path / "silent.py"
    script.write_text("import time\ntime.sleep(600)\n")
    import sys
    server = ManagedServer(cmd=[sys.executable, str(script)], host="127.0.0.1", port=1,
                           log_path=str(tmp_path / "silent.log"))
    with pytest.raises(RuntimeError, match="not healthy"):
        server.start(health_timeout=1.0)
    assert not server.alive()


def test_sglang_launcher_without_sglang_says_what_to_do():
    if is_sglang_available():
        pytest.skip("sglang is installed here; the missing-package message is not reachable")
    with pytest.raises(RuntimeError, match="opd-train serve"):
        launch_sglang_server(MODEL_V1)


@pytest.mark.gpu
@pytest.mark.skipif(not is_sglang_available(), reason="sglang is not importable on this machine (it needs a CUDA "
                    "machine; SPEC §5): the real-SGLang launcher test runs only where `import sglang` works")
def test_real_sglang_launch_generate_score_update(hf):
    server = launch_sglang_server(MODEL_V1, extra_args=("--skip-tokenizer-init", "--dtype", "float32",
                                                        "--mem-fraction-static", "0.2"), health_timeout=900)
    try:
        eng = SGLangEngine(server=server, vocab_size=1000)
        teacher = SGLangTeacher(SGLangTeacherConfig(url=server.url, vocab_size=1000))
        assert eng.health(generate=True)
        scores = asyncio.run(teacher.ascore(P1, len(P1) - 1))
        assert (scores.logprobs - _ref_scores(hf["v1"], P1)).abs().max() <= 1e-2   # bf16/tf32 kernels on GPU
        groups = eng.generate([P1, P2], SamplingParams(max_new_tokens=4), n=2)
        assert [len(g) for g in groups] == [2, 2]
        eng.update_weights_from_disk(MODEL_V2, weight_version="v2")
        after = asyncio.run(teacher.ascore(P1, len(P1) - 1))
        assert (after.logprobs - _ref_scores(hf["v2"], P1)).abs().max() <= 1e-2
        teacher.close()
        eng.shutdown()
    finally:
        server.stop()
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)
