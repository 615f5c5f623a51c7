"""Observability of a run: a progress bar, per-step metrics to JSONL and TensorBoard, a PNG plot at the end, and
a quiet terminal (the progress bar, evaluations, errors and tables; everything else in ``OUTPUT_DIR/logs/``).

Files in ``--output-dir``: ``metrics.jsonl`` (one JSON object per rollout step: ``{"step": k, "<name>": value}``,
appended, so a resumed run continues the same file), ``tensorboard/`` (event files), ``curves.png``.
Metric names: ``rollout/*`` (reward, accuracy, response length), ``opd/*`` (reverse KL, teacher log-prob mean),
``train/*`` (loss, entropy, grad norm, clip fraction...), ``eval/*`` (pass@1), ``time/*`` (seconds per phase),
``perf/*`` (throughput).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from typing import Iterable

from .config import LogConfig

# Curves of the PNG (those present are drawn), in this order.
PLOTTED = ("eval/pass@1", "rollout/accuracy", "rollout/reward", "opd/reverse_kl", "opd/teacher_logprob_mean",
           "train/loss", "train/entropy", "perf/step_seconds")
BAR_KEYS = {"eval/pass@1": "eval", "rollout/accuracy": "acc", "opd/reverse_kl": "kl", "rollout/reward": "r"}


LOG_DIR = "logs"   # under --output-dir: driver.log (Ray, warnings), trainer-rank<r>.log, rollout.log, engine<i>.log


def log_dir(output_dir: str) -> str:
    path = os.path.join(output_dir, LOG_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def redirect_output(path: str | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2: C++ and subprocess output too) to ``path``,
    appended; None leaves them alone (``--verbose``). For Ray actors, whose output would reach the terminal."""
    if path is None:
        return
    import sys
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _point(path, 1, 2)


def _point(path: str, *fds: int) -> None:
    """Make the file descriptors ``fds`` write to ``path`` (appended)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in fds:
        os.dup2(fd, target)
    os.close(fd)


@contextmanager
def stderr_to(path: str | None):
    """File descriptor 2 goes to ``path`` (appended) inside the block, then back; None: unchanged. For libraries
    that print from C++ straight to the terminal (Ray's "Token authentication is enabled" notice at ray.init)."""
    if path is None:
        yield
        return
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    _point(path, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_driver(output_dir: str, verbose: bool) -> str | None:
    """Route the driver's Python warnings and Ray's log records to ``OUTPUT_DIR/logs/driver.log`` (unless
    ``verbose``); returns that path."""
    import logging
    if verbose:
        return None
    try:
        import ray  # noqa: F401  (importing ray configures its loggers: attach ours after that)
    except ImportError:
        pass
    path = os.path.join(log_dir(output_dir), "driver.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("py.warnings", "ray"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("ray").setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


class Timer:
    """Seconds per phase of one rollout step (``time/<phase>``) and throughput (``perf/*``)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self, num_samples: int) -> dict[str, float]:
        total = time.perf_counter() - self.start
        return {**{f"time/{k}": v for k, v in self.phases.items()}, "perf/step_seconds": total,
                "perf/samples_per_second": num_samples / max(total, 1e-9)}


class RunLogger:
    def __init__(self, log: LogConfig, *, total_steps: int, start_step: int = 0, name: str = "opd"):
        os.makedirs(log.output_dir, exist_ok=True)
        self.dir = log.output_dir
        self.jsonl_path = os.path.join(log.output_dir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        self._tb = None
        if not log.no_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(log.output_dir, "tensorboard"))
        self._bar = None
        if not log.no_progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        self.last.update(clean)
        if self._bar is not None:
            self._bar.set_postfix({short: f"{self.last[k]:.3g}" for k, short in BAR_KEYS.items() if k in self.last},
                                  refresh=False)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self, *, plot: bool = True) -> str | None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        return plot_curves(self.jsonl_path, os.path.join(self.dir, "curves.png")) if plot else None


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plotted_keys(data: dict[str, list[dict]], keys: Iterable[str] = PLOTTED) -> list[str]:
    """The keys with a curve to draw: present in some run, and not one value repeated over every step of every run
    (the reward of a run without a reward function is 0 throughout; a flat panel says nothing)."""
    out = []
    for key in keys:
        values = [row[key] for rows in data.values() for row in rows if key in row]
        if values and (len(values) == 1 or len(set(values)) > 1):
            out.append(key)
    return out


def plot_curves(jsonl_path: str, png_path: str, keys: Iterable[str] = PLOTTED,
                runs: dict[str, str] | None = None) -> str | None:
    """Plot the curves of one run (or of several: ``runs`` = {label: jsonl path}) into a PNG grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sources = runs or {"": jsonl_path}
    data = {label: read_metrics(p) for label, p in sources.items() if os.path.isfile(p)}
    present = plotted_keys(data, keys)
    if not present:
        return None
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for i, (label, series) in enumerate(data.items()):     # a run keeps its colour where another lacks a key
            pts = [(r["step"], r[key]) for r in series if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label or None, color=f"C{i % 10}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("rollout step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if runs:                      # one legend under the grid: per-panel legends covered the curves
        legend = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=max(1, min(len(legend), 2)),
                   fontsize=8, frameon=False)
        legend_lines = math.ceil(len(legend) / 2)
        fig.tight_layout(rect=(0, 0.08 * legend_lines / rows, 1, 1))     # room for the legend under the grid
    else:
        fig.tight_layout()
    tmp = f"{png_path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
