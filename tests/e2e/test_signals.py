"""A run stopped by a signal at any phase leaves no process behind, and a training run saves where it was.

``opd-train`` runs as a real subprocess (the built-in experiment, shortened); every process it starts (Ray's
processes and actors, the engine servers, the teacher server) is recorded while it runs; a signal arrives at a
given phase; afterwards none of them may be alive, and no process may still hold the run's (unique) paths.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(600)

EXE = os.path.join(os.path.dirname(sys.executable), "opd-train")
# phase -> the first line of output after which the signal is sent
PHASES = {"sft": "[experiment] SFT of the teacher", "startup": "[experiment] student SFT + OPD (",
          "training": "[opd-train] step 2: eval"}


def _alive(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _holding(paths) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(path in cmd for path in paths) and p.pid != os.getpid():
            found.append(f"{p.pid} {cmd[:160]}")
    return found


@pytest.mark.parametrize("phase, sig", [("sft", signal.SIGHUP), ("startup", signal.SIGTERM),
                                        ("training", signal.SIGINT)])
def test_a_signal_stops_every_process_the_run_started(tmp_path, phase, sig):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [EXE if os.path.exists(EXE) else sys.executable, *([] if os.path.exists(EXE) else ["-m", "opd_train.cli"]),
           "--experiment-fast", "--num-rollout", "40", "--output-dir", str(out), "--experiment-cache-dir", str(cache),
           "--no-progress", "--no-experiment-baseline", "--opd-kl-estimator", "k1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, seen = [], {}
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + 400
    try:
        while not any(PHASES[phase] in line for line in lines):
            assert proc.poll() is None, "the run ended before the phase:\n" + "".join(lines[-30:])
            assert time.monotonic() < deadline, "the phase never came:\n" + "".join(lines[-30:])
            for child in root.children(recursive=True):
                seen.setdefault(child.pid, child)
            time.sleep(0.1)
        for child in root.children(recursive=True):
            seen.setdefault(child.pid, child)
        proc.send_signal(sig)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    text = "".join(lines)
    assert code == 128 + sig, text[-3000:]
    assert f"interrupted by {signal.Signals(sig).name}" in text
    if phase != "sft":
        assert len(seen) >= 3, f"expected Ray, actors and servers among the run's processes, saw {len(seen)}"
    for _ in range(60):                       # Ray's processes may take a few seconds to go
        left = _alive(seen.values()) + _holding([str(out), str(cache)])
        if not left:
            break
        time.sleep(0.5)
    assert not left, "processes outlived the run:\n" + "\n".join(left)
    if phase == "training":
        assert "resume with: --load" in text
        tracker = out / "opd" / "checkpoints" / "latest_checkpointed_iteration.txt"
        rows = [json.loads(r) for r in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
        assert int(tracker.read_text()) == max(r["step"] for r in rows if "train/loss" in r) >= 2
