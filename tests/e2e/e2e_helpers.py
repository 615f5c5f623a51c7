"""Helpers of the end-to-end tests (the fixtures are in conftest.py)."""
from __future__ import annotations

import json
import os

POOL = None       # the session's RuntimePool (conftest.ray_cluster): runs of one shape reuse warm actors


def driver_values(toy, out, **overrides) -> dict:
    values = dict(hf_checkpoint=toy["student"], prompt_data=toy["train"], eval_prompt_data=toy["eval"],
                  output_dir=str(out), rollout_batch_size=4, n_samples_per_prompt=4, global_batch_size=8,
                  num_rollout=2, rollout_max_response_len=5, lr=1e-3, eval_rm_type="exact_match",
                  eval_max_response_len=5, max_tokens_per_gpu=512, no_progress=True, no_tensorboard=False)
    values.update(overrides)
    return values


def run_driver(toy, out, **overrides) -> dict:
    from opd_train.config import build_config, validate
    from opd_train.train import run
    return run(validate(build_config(driver_values(toy, out, **overrides))), pool=POOL)


def read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_rows(out) -> dict[int, dict]:
    """The training metrics row of each step (eval rows are logged separately)."""
    return {r["step"]: r for r in read_metrics(out) if "train/loss" in r}
