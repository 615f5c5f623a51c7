"""Shared pieces of the end-to-end tests: tiny SFT models of the toy task, its prompt files, one Ray cluster, one
teacher server (our CPU engine over HTTP), and ``run_driver`` (the real training loop, short runs).

Everything is real: Ray actors, the Megatron trainer on gloo, our SGLang-protocol engines as subprocesses.
The models are trained for a few SFT steps only (the driver's behaviour is under test, not the accuracy).
"""
from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    from opd_train.toy import task
    from opd_train.toy.experiment import STUDENT
    from opd_train.toy.models import SFTSettings, build_sft_model
    root = tmp_path_factory.mktemp("toy")
    pairs = task.sample_pairs(random.Random(1), 32, held_out=True)
    teacher, _ = build_sft_model(SFTSettings(STUDENT, steps=40, lr=3e-3, batch_size=32, seed=0), str(root),
                                 "teacher", eval_pairs=pairs, log=lambda *_: None)
    student, _ = build_sft_model(SFTSettings(STUDENT, steps=5, lr=1e-3, batch_size=32, seed=1), str(root),
                                 "student", eval_pairs=pairs, log=lambda *_: None)
    train, evals = task.write_task_files(str(root / "data"), train_prompts=256, eval_prompts=16, seed=0)
    return {"root": root, "teacher": teacher, "student": student, "train": train, "eval": evals}


@pytest.fixture(scope="session")
def trained_toy(toy, tmp_path_factory):
    """A student that has learnt something (SFT until 40% validation accuracy, as in the built-in experiment) and a
    teacher that knows the task: the pair whose student one un-warmed Adam step wrecks (~50 s of SFT)."""
    from opd_train.toy import task
    from opd_train.toy.experiment import STUDENT, TEACHER
    from opd_train.toy.models import SFTSettings, build_sft_model
    root = tmp_path_factory.mktemp("trained_toy")
    pairs = task.sample_pairs(random.Random(1), 64, held_out=True)
    teacher, _ = build_sft_model(SFTSettings(TEACHER, steps=330, lr=1e-3, batch_size=128, seed=0, decay_start=250),
                                 str(root), "teacher", eval_pairs=pairs, log=lambda *_: None)
    student, _ = build_sft_model(SFTSettings(STUDENT, steps=800, lr=1e-3, batch_size=128, seed=1,
                                             stop_at_accuracy=0.4), str(root), "student", eval_pairs=pairs,
                                 log=lambda *_: None)
    train, evals = task.write_task_files(str(root / "data"), train_prompts=4096, eval_prompts=128, seed=0)
    return {"root": root, "teacher": teacher, "student": student, "train": train, "eval": evals}


@pytest.fixture(scope="session")
def teacher_dist(toy):
    """The teacher as a torch_dist checkpoint (via the `opd-train convert` command)."""
    from opd_train.toy.experiment import _convert_teacher
    return _convert_teacher(toy["teacher"], None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster; runs of the same shape reuse warm actors and engines (like the experiment does)."""
    import ray

    import e2e_helpers
    from opd_train.orchestration.runtime import RuntimePool
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with RuntimePool() as pool:
        e2e_helpers.POOL = pool
        yield pool
    e2e_helpers.POOL = None
    ray.shutdown()


@pytest.fixture(scope="session")
def teacher_server(toy):
    from opd_train.rollout.engines import launch_cpu_engine
    server = launch_cpu_engine(toy["teacher"], log_path=str(toy["root"] / "teacher.log"))
    yield server
    server.stop()
