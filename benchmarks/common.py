"""Shared benchmark machinery: timing, memory-bandwidth probes, peak-memory and machine-load meters, the bytes
model and the machine record. Used by the sweep (``python -m benchmarks``) and the pytest-benchmark suites.

Timing: ``warmup`` untimed calls, then repeats until about ``target_s`` of work (between ``min_reps`` and
``max_reps``); the median is reported. CPU: ``time.perf_counter``; CUDA: a pair of CUDA events per repeat and one
synchronize at the end (the launch queue is never drained between repeats, as in a training loop).

Peak memory: CPU: torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see its allocations, so
we read the kernel's resident-set high-water mark (VmHWM in /proc/self/status) after resetting it
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and after ``malloc_trim(0)`` has returned freed heap pages, so
memory freed by earlier calls cannot hide the call's own allocations. Exact to the page, in-process, and it sees
every allocation (torch, OpenMP, the C++ kernels). CUDA: ``torch.cuda.max_memory_allocated`` delta.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 30
    target_s: float = 1.0   # aim for this much timed work per case (after the first timed repeat)


QUICK_POLICY = TimingPolicy(warmup=1, min_reps=3, max_reps=10, target_s=0.25)


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    reps: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, policy: TimingPolicy,
            prior: tuple[float, ...] = ()) -> Timing:
    """Median wall time of ``fn()`` on ``device`` (see the module docstring for the method). ``prior``: times of
    calls already made in the same conditions (they count as repeats: slow cases need fewer extra calls)."""
    for _ in range(policy.warmup):
        fn()
    synchronize(device)
    times = list(prior) or [_time_once(fn, device)]
    reps = max(policy.min_reps, min(policy.max_reps, int(policy.target_s / max(min(times), 1e-6))))
    times += _time_many(fn, device, reps - len(times))
    return Timing(statistics.median(times), min(times), len(times))


def _time_once(fn, device) -> float:
    return _time_many(fn, device, 1)[0]


def _time_many(fn, device, n: int) -> list[float]:
    if n <= 0:
        return []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# -------------------------------------------------------------------------------------------- bandwidth probes
@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Plain-PyTorch memory passes over one tensor: the hardware limit the fused ops are compared with."""
    nbytes: int
    copy_gbps: float   # dst.copy_(x) into a preallocated dst; counts read + write bytes (2 * nbytes)
    read_gbps: float   # the faster of x.sum() and x.amax(): one plain read pass
    read_op: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def probe_bandwidth(x: torch.Tensor, policy: TimingPolicy) -> Bandwidth:
    """Copy and read-pass bandwidth over ``x`` (the same tensor, device and dtype the op reads).

    The copy target is preallocated (and touched) outside the timing: ``torch.empty_like(x).copy_(x)`` would
    also time the kernel's first-touch page faults of a fresh buffer, which on CPU cost more than the copy.
    """
    dst = torch.empty_like(x)
    dst.zero_()
    copy = time_fn(lambda: dst.copy_(x), x.device, policy).median_s
    del dst
    reads = {name: time_fn(fn, x.device, policy).median_s
             for name, fn in (("sum", lambda: x.sum()), ("amax", lambda: x.amax()))}
    read_op = min(reads, key=reads.get)
    nbytes = x.numel() * x.element_size()
    return Bandwidth(nbytes, 2 * nbytes / copy / 1e9, nbytes / reads[read_op] / 1e9, read_op)


# ------------------------------------------------------------------------------------------------ peak memory
_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def cpu_peak_supported() -> str | None:
    """None when the RSS high-water method works here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
    except OSError as exc:
        return f"cannot reset the RSS high-water mark ({exc}); needs Linux >= 4.0 and /proc"
    return None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, object, float]:
    """Peak memory above what was in use before one call of ``fn`` (the result stays alive until the end, so
    returned tensors count; subtract them where they are required outputs). Returns (bytes, result, seconds):
    the call is timed too (the resets happen before the clock starts), so it can count as a repeat."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return torch.cuda.max_memory_allocated(device) - before, out, seconds
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return max(0, _proc_status_bytes("VmHWM") - before), out, seconds


def storage_bytes(result) -> int:
    """Bytes of the distinct storages of the tensors in ``result`` (a tensor or nested tuple/list)."""
    seen, total = set(), 0
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return total


# ------------------------------------------------------------------------------------------------ machine load
class ForeignLoad:
    """CPU time used by OTHER processes while a block runs, in cores (0 = quiet, 1 = one core busy elsewhere).

    os.getloadavg() during a run counts the benchmark's own threads; this subtracts them: system busy time
    (user + nice + system + irq + softirq) minus this process's user + system time, over the wall time.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.samples: list[float] = []

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    @contextlib.contextmanager
    def measure(self):
        wall, busy, own = time.perf_counter(), self._busy(), self._own()
        yield
        dt = time.perf_counter() - wall
        if dt > 0.05:  # too short a window reads only clock-tick noise
            self.samples.append(max(0.0, (self._busy() - busy) - (self._own() - own)) / dt)

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None

    def max(self) -> float | None:
        return max(self.samples) if self.samples else None


# ------------------------------------------------------------------------------------------------ bytes model
PER_ROW_BYTES = {
    # tokens int64 in, logp fp32 out (+ the fp32 upstream gradient for fwd+bwd)
    ("token_logprobs", "fwd"): 8 + 4,
    ("token_logprobs", "fwd+bwd"): 8 + 4 + 4,
    # tokens, teacher log-prob, advantage, mask (bool) in; advantage, kl, logp out
    ("opd_advantages", "fwd"): 8 + 4 + 4 + 1 + 3 * 4,
    # kl out (+ upstream gradient)
    ("reverse_kl", "fwd"): 4,
    ("reverse_kl", "fwd+bwd"): 4 + 4,
}
N_LOGITS = {"token_logprobs": 1, "opd_advantages": 1, "reverse_kl": 2}
MODES = {"token_logprobs": ("fwd", "fwd+bwd"), "opd_advantages": ("fwd",), "reverse_kl": ("fwd", "fwd+bwd")}


def bytes_moved(op: str, mode: str, T: int, V: int, elt: int) -> int:
    """Bytes the op must move at minimum: every logits matrix read once, the gradient (the student's logits'
    shape and dtype) written once for fwd+bwd, plus the per-row tensors."""
    logits = N_LOGITS[op] * T * V * elt
    grad = T * V * elt if mode == "fwd+bwd" else 0
    return logits + grad + T * PER_ROW_BYTES[(op, mode)]


def floor_seconds(op: str, mode: str, T: int, V: int, elt: int, bw: Bandwidth) -> float:
    """The plain-PyTorch memory pass with the same traffic: one read pass over each logits matrix, except the
    student's when a gradient is written (fwd+bwd): then one copy of it (read + write)."""
    one = T * V * elt
    reads = N_LOGITS[op] - (1 if mode == "fwd+bwd" else 0)
    copies = 1 if mode == "fwd+bwd" else 0
    return reads * one / (bw.read_gbps * 1e9) + copies * 2 * one / (bw.copy_gbps * 1e9)


# ------------------------------------------------------------------------------------------------ machine record
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.rstrip()  # not strip(): porcelain lines start with a space
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for short in ("h200", "h100", "a100", "l40s", "b200"):
            if short in name:
                return short
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return "cpu"


def machine_record(device: torch.device) -> dict:
    """What ran where: machine, device, versions, git commit (+ which kernel sources were modified)."""
    rec = {"hostname": platform.node(), "os": platform.platform(), "cpu_model": cpu_model(),
           "cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "device": device.type,
           "device_slug": device_slug(device), "gpu_name": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_sm_count=props.multi_processor_count)
    rec["versions"] = versions()
    rec["git"] = git_record()
    rec["opd_library"] = library_record()
    return rec


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "liger_kernel", "numpy"):
        try:
            module = __import__(mod)
            out[mod] = getattr(module, "__version__", "installed")
        except ImportError:
            out[mod] = None
    return out


def library_record() -> dict:
    """Which compiled op library was loaded, and when it was built (the .so may predate uncommitted edits)."""
    try:
        from opd_kernels import _C
    except ImportError as exc:
        return {"path": None, "error": str(exc)}
    path = Path(_C.__file__)
    built = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")
    return {"path": str(path), "built": built}


def git_record() -> dict:
    dirty = _git("status", "--porcelain", "--", "opd_kernels", "csrc", "benchmarks", "CMakeLists.txt")
    return {"commit": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "modified_kernel_or_benchmark_files": [ln[3:] for ln in dirty.splitlines()] if dirty else []}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def today() -> str:
    return _dt.date.today().isoformat()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_record(record: dict, stem: Path, markdown: Callable[[dict], str]) -> list[Path]:
    """``stem``.json (the record) and ``stem``.md (``markdown(record)``); returns both paths."""
    paths = [stem.parent / (stem.name + ".json"), stem.parent / (stem.name + ".md")]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(markdown(record))
    return paths
