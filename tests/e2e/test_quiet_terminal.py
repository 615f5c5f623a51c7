"""The terminal of a default-style run holds the progress bar, evaluations and the table, not third-party noise.

``opd-train`` runs as a real subprocess (the built-in experiment, shortened: every component starts, Megatron's
optimizer steps, Ray starts, the engines serve). Megatron's and torch's warnings (deprecated collectives, the
Apex / TransformerEngine fallback, ``GPTModel IS DEPRECATED``), Ray's token-auth notice and HF's progress bars must
land under OUTPUT_DIR/logs/, not on the terminal; ``--verbose`` is the way to see them.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)

EXE = os.path.join(os.path.dirname(sys.executable), "opd-train")
NOISE = ("Warning", "warning:", "DEPRECATED", "deprecated", "Token authentication", "Apex", "TransformerEngine",
         "Writing model shards", "Loading weights", "Traceback")


@pytest.mark.parametrize("teacher", ["sglang", "megatron"])
def test_default_run_terminal_is_quiet(tmp_path, teacher):
    """Both teacher modes (Megatron mode also converts the teacher, a subprocess with its own notices)."""
    out = tmp_path / "run"
    proc = subprocess.run([EXE, "--experiment-fast", "--no-experiment-baseline", "--output-dir", str(out),
                           "--experiment-cache-dir", str(tmp_path / "cache"), "--opd-type", teacher],
                          capture_output=True, text=True, timeout=540)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-3000:]
    noisy = [line for line in terminal.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy[:20])
    assert "held-out pass@1" in terminal and "logs/" in terminal          # the table, and where the rest went
    assert "on cpu, 1 torch thread(s) each" in terminal, terminal[:3000]    # a 0.13M model: one thread is faster
    logs = "".join(p.read_text(errors="replace") for p in pathlib.Path(out).rglob("logs/*.log"))
    assert "Warning" in logs or "warning" in logs, "the third-party output should be in the log files"
