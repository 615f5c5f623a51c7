"""A teacher server that dies in the middle of a run: retries, then a clear error and a resumable checkpoint."""
from __future__ import annotations

import os
import threading
import time

import pytest

from e2e_helpers import read_metrics, run_driver, step_rows

pytestmark = pytest.mark.timeout(900)


def _kill_after_first_step(server, out, done: threading.Event):
    path = os.path.join(out, "metrics.jsonl")
    while not done.is_set():
        if os.path.isfile(path) and any("train/loss" in r for r in read_metrics(out)):
            server.stop(grace=1.0)
            return
        time.sleep(0.05)


def test_dying_teacher_stops_with_a_resumable_checkpoint(toy, ray_cluster, tmp_path):
    from opd_train.types import TeacherUnavailable
    from opd_train.rollout.engines import launch_cpu_engine
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    teacher = launch_cpu_engine(toy["teacher"], log_path=str(tmp_path / "teacher.log"))
    url = teacher.url + "/generate"
    done = threading.Event()
    killer = threading.Thread(target=_kill_after_first_step, args=(teacher, str(out), done), daemon=True)
    killer.start()
    started = time.perf_counter()
    try:
        with pytest.raises(TeacherUnavailable) as exc:
            run_driver(toy, out, num_rollout=50, use_opd=True, opd_type="sglang", rm_url=url, save=str(ckpt),
                       opd_teacher_max_retries=2, opd_teacher_timeout=5.0, eval_prompt_data=None)
    finally:
        done.set()
        teacher.stop(grace=1.0)
    assert time.perf_counter() - started < 600
    err = exc.value
    assert err.url.startswith(teacher.url) and "did not answer after 3 attempts" in str(err)
    completed = max(step_rows(out))
    assert err.checkpoint_step == completed >= 1
    # The checkpoint is complete and is the latest: no temporary (half-written) directory is left behind.
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(completed)
    assert os.path.isdir(err.checkpoint) and not [n for n in os.listdir(ckpt) if "tmp" in n]
    # A new teacher, --load: the run continues with the next step.
    teacher2 = launch_cpu_engine(toy["teacher"], log_path=str(tmp_path / "teacher2.log"))
    try:
        run_driver(toy, tmp_path / "resumed", num_rollout=completed + 1, use_opd=True, opd_type="sglang",
                   rm_url=teacher2.url + "/generate", load=str(ckpt), save=str(ckpt), eval_prompt_data=None)
    finally:
        teacher2.stop(grace=1.0)
    assert sorted(step_rows(tmp_path / "resumed")) == [completed + 1]
