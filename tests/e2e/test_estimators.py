"""OPD on top of every advantage estimator, end to end (one rollout step each, SGLang teacher, task reward on)."""
from __future__ import annotations

import math

import pytest

from e2e_helpers import run_driver, step_rows

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("estimator, extra", [
    ("gspo", {}),
    ("ppo", {"kl_coef": 0.01, "critic_lr": 1e-3}),
    ("reinforce_plus_plus", {"kl_coef": 0.01}),
    ("reinforce_plus_plus_baseline", {"opd_kl_estimator": "k3"}),
])
def test_opd_with_each_estimator(toy, ray_cluster, teacher_server, tmp_path, estimator, extra):
    run_driver(toy, tmp_path / estimator, num_rollout=1, advantage_estimator=estimator, use_opd=True,
               opd_type="sglang", rm_url=teacher_server.url + "/generate", rm_type="exact_match",
               eval_prompt_data=None, **extra)
    row = step_rows(tmp_path / estimator)[1]
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["opd/reverse_kl"])
    assert row["train/advantage_abs_mean"] > 0
    if estimator == "ppo":
        assert math.isfinite(row["train/critic/value_loss"])
    if estimator.startswith("reinforce_plus_plus"):           # whitening is part of the method
        assert row["train/advantage_abs_mean"] == pytest.approx(0.8, abs=0.3)
