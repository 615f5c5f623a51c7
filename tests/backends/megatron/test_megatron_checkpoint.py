"""torch_dist checkpoints: resume equals an uninterrupted run; a save killed half-way leaves the previous one."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from mg_helpers import load_result


def _equal_weights(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(single_run):
    return load_result(single_run, "resume_a")


@pytest.fixture(scope="module")
def resumed(resume_run):
    return load_result(resume_run[0], "resume_b")


@pytest.fixture(scope="module")
def after_kill(resume_run):
    return load_result(resume_run[0], "after_crash")


def test_save_interval_and_latest(uninterrupted, resumed):
    b = resumed
    assert uninterrupted["iterations"] == [2, 4]
    with open(os.path.join(uninterrupted["dir"], "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "4"
    # --load resumes the latest iteration: its weights and its step.
    assert b["loaded_step"] == 4
    assert _equal_weights(b["weights_loaded"], uninterrupted["weights"][4])


def test_resumed_run_continues_exactly(uninterrupted, resumed):
    """New process, resume iteration 2 (model + Adam state + LR schedule), redo steps 3-4: same as never stopped."""
    b = resumed
    assert b["explicit_step"] == 2
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "clipfrac"):
            assert b["metrics"][step][key] == pytest.approx(uninterrupted["metrics"][step][key], rel=1e-6, abs=1e-7)
        assert b["metrics"][step]["step"] == step
    assert _equal_weights(b["weights"], uninterrupted["weights"][4])
    # The LR schedule (warmup 1, cosine) changes the lr between steps: it was restored, not restarted.
    assert uninterrupted["metrics"][3]["lr"] != uninterrupted["metrics"][4]["lr"]


def test_killed_save_leaves_previous_checkpoint_loadable(after_kill, resume_run):
    after, code = after_kill, resume_run[1]
    assert code == -signal.SIGKILL                         # the save at step 2 was killed ...
    assert len(after["stale_before"]) == 1                 # ... with its shards already on disk in a temp dir
    assert after["stale_files"] >= 2
    assert after["iterations_before"] == [1]
    assert after["loaded_step"] == 1                       # the tracker still names iteration 1


def test_resume_after_kill_equals_uninterrupted_step(after_kill, resume_run):
    out, after = resume_run[0], after_kill
    record = torch.load(os.path.join(out, "crash_record.pt"), weights_only=False)
    assert _equal_weights(after["weights_loaded"], record["weights_1"])
    for key in ("loss", "grad_norm", "lr"):
        assert after["m2"][key] == pytest.approx(record["m2"][key], rel=1e-6, abs=1e-7)
    assert _equal_weights(after["weights_2"], record["weights_2"])
    # The next save publishes normally and clears the dead temp dir.
    assert after["iterations_after"] == [1, 2] and after["tracker"] == "2"
    assert after["stale_after"] == []


def test_frozen_parameters_stay_through_training_and_resume(single_run):
    """--freeze-params-name-list embedding (slime's flag): the embedding keeps its values through two steps, a
    save, a resume and a third step, while every other tensor (the untied output layer included) moves; a pattern
    that matches no parameter, or a list that freezes everything, is refused with the names to choose from."""
    r = load_result(single_run, "frozen")
    assert r["frozen"] == ["embedding.word_embeddings.weight"]
    assert r["resumed_step"] == 2
    for later in ("after", "after_resume"):
        assert torch.equal(r[later]["model.embed_tokens.weight"], r["before"]["model.embed_tokens.weight"])
    moved = [k for k in r["before"] if not torch.equal(r["after"][k], r["before"][k])]
    assert set(moved) == set(r["before"]) - {"model.embed_tokens.weight"}
    assert not torch.equal(r["after_resume"]["lm_head.weight"], r["after"]["lm_head.weight"])
    assert "'embeding' matches no parameter" in r["typo"] and "decoder.layers.N." in r["typo"]
    assert "nothing is left to train" in r["everything"]
