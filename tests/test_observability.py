"""The curves PNG: which panels are drawn, and that several runs (one lacking a metric) plot into one file."""
from __future__ import annotations

import json

import pytest

from opd_train.observability import plot_curves, plotted_keys


def test_a_metric_repeating_one_value_everywhere_gets_no_panel():
    data = {"a": [{"step": 1, "rollout/reward": 0.0, "train/loss": 1.0}, {"step": 2, "rollout/reward": 0.0}],
            "b": [{"step": 1, "rollout/reward": 0.0, "train/loss": 0.5, "perf/step_seconds": 3.0}]}
    # reward is 0 at every step of every run; loss varies; one point of step time is still a value to show
    assert plotted_keys(data, ("rollout/reward", "train/loss", "perf/step_seconds", "eval/pass@1")) == [
        "train/loss", "perf/step_seconds"]
    assert plotted_keys({"a": [{"step": 1, "rollout/reward": 0.0}, {"step": 2, "rollout/reward": 1.0}]},
                        ("rollout/reward",)) == ["rollout/reward"]


def test_several_runs_plot_into_one_png_with_a_shared_legend(tmp_path):
    pytest.importorskip("matplotlib")
    paths = {}
    for label, rows in {"run A": [{"step": s, "train/loss": 1.0 / s, "rollout/reward": 0.0} for s in (1, 2, 3)],
                        "run B": [{"step": s, "perf/step_seconds": 2.0 + s} for s in (1, 2)]}.items():
        paths[label] = tmp_path / f"{label}.jsonl"
        paths[label].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_curves("", str(tmp_path / "curves.png"), runs={k: str(v) for k, v in paths.items()})
    assert out == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))
    assert plot_curves("", str(tmp_path / "none.png"), runs={"empty": str(tmp_path / "missing.jsonl")}) is None
