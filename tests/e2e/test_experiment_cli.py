"""The CPU default experiment through the console entry point (shortened with --experiment-fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)


def test_experiment_fast_writes_the_table(ray_cluster, tmp_path, capsys):
    from opd_train import cli
    out = tmp_path / "exp"
    assert cli.main(["--experiment-fast", "--output-dir", str(out), "--experiment-cache-dir",
                     str(tmp_path / "cache"), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    table = results["table"]
    assert list(table) == ["student SFT", "student SFT + OPD (sampled k1, slime's objective)",
                           "student SFT + OPD (exact KL)", "student SFT + GRPO (reward only)", "teacher"]
    assert all(0.0 <= v <= 1.0 for v in table.values())
    for name in ("opd_k1", "opd_exact", "grpo"):
        assert [s for s, _ in results["eval_curves"][name]][0] == 0
        assert os.path.isfile(out / name / "metrics.jsonl")
    assert results["per_run"]["opd_k1"]["gap_closed"] is None or isinstance(results["per_run"]["opd_k1"]["gap_closed"],
                                                                              float)
    assert results["runs"]["opd_k1"]["opd_kl_estimator"] == "k1" and results["runs"]["opd_exact"]["opd_kl_mode"] == "full"
    assert os.path.isfile(out / "curves.png")
    assert "| student SFT + OPD (sampled k1, slime's objective) |" in capsys.readouterr().out


def test_console_script_rejects_bad_flags_fast(tmp_path):
    """The installed `opd-train` refuses an invalid combination with status 2 and starts nothing."""
    exe = os.path.join(os.path.dirname(sys.executable), "opd-train")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "opd_train.cli"]
    proc = subprocess.run(cmd + ["--use-opd", "--opd-type", "sglang", "--opd-teacher-load", str(tmp_path),
                                 "--output-dir", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--opd-teacher-load is for --opd-type megatron" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_serve_and_convert_subcommands(toy, tmp_path, capsys):
    """`opd-train serve` is the CPU engine's entry point; `opd-train convert` round-trips HF <-> torch_dist."""
    from opd_train import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0 and "--model" in capsys.readouterr().out
    dist, back = tmp_path / "dist", tmp_path / "back"
    exe = os.path.join(os.path.dirname(sys.executable), "opd-train")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "opd_train.cli"]
    for argv in (["convert", "hf2dist", toy["student"], str(dist)], ["convert", "dist2hf", str(dist), str(back)]):
        proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file
    original = load_file(os.path.join(toy["student"], "model.safetensors"))
    roundtrip = load_file(os.path.join(back, "model.safetensors"))
    assert original.keys() == roundtrip.keys()
    assert all((original[k] == roundtrip[k]).all() for k in original)
