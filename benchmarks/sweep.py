"""``python -m benchmarks``: time every (op, mode, T, V, dtype, backend) case against the baselines and the
memory-bandwidth limit measured in the same run; write ``benchmarks/results/<device>-<date>.{json,md,png}``.

Examples::

    python -m benchmarks --quick                      # ~1 minute on a 2-core CPU: check before a commit
    python -m benchmarks                              # the full CPU sweep (T 1024/4096, V 32000/151936, fp32/bf16)
    python -m benchmarks --device cuda                # GPU: T up to 32768, + triton, cuda and Liger
    python -m benchmarks --ops token_logprobs:fwd reverse_kl --backends cpp naive --T 4096 --V 32000
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch

from . import common, impls, report
from .common import DTYPES, MODES, Bandwidth, ForeignLoad, TimingPolicy

DEFAULT_T = {"cpu": (1024, 4096), "cuda": (1024, 4096, 8192, 32768)}
DEFAULT_V = (32000, 151936)
QUICK = {"T": (1024,), "V": (32000,)}
PROVISIONAL_LOAD = 1.2        # 1-minute load average of the machine before the run (other users)
PROVISIONAL_FOREIGN = 0.5     # cores used by other processes during the run, on average


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    device: torch.device
    Ts: tuple[int, ...]
    Vs: tuple[int, ...]
    dtypes: tuple[str, ...]
    ops: tuple[tuple[str, str], ...]   # (op, mode)
    impls: tuple[str, ...]
    policy: TimingPolicy
    quick: bool
    out_stem: Path                     # writes out_stem.json / .md / .png
    check_rows: int
    seed: int
    plot: bool
    note: str = ""
    threads: int | None = None
    argv: tuple[str, ...] = ()
    fused_linear: bool = False         # then run bench_fused_linear (output layer + loss, chunked over tokens)
    inplace: bool = False              # then run bench_inplace (inplace_backward=True, interleaved allocations)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(device=str(self.device), out_stem=str(self.out_stem), ops=[f"{o}:{m}" for o, m in self.ops])
        return d


def _op_specs(names: list[str] | None) -> tuple[tuple[str, str], ...]:
    if not names:
        return tuple((op, mode) for op, modes in MODES.items() for mode in modes)
    specs = []
    for name in names:
        op, _, mode = name.partition(":")
        if op not in MODES:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from {sorted(MODES)} (optionally op:mode)")
        if mode and mode not in MODES[op]:
            raise SystemExit(f"--ops: {op} has modes {list(MODES[op])}, not {mode!r}")
        specs.extend((op, m) for m in ((mode,) if mode else MODES[op]))
    return tuple(dict.fromkeys(specs))


def _split(values: list[str] | None) -> list[str] | None:
    return None if values is None else [v for item in values for v in item.split(",") if v]


def parse_args(argv: list[str] | None = None) -> SweepConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=1024, V=32000, fewer repeats (~35 s on 2 CPU cores)")
    all_ops = [f"{o}:{m}" for o, ms in MODES.items() for m in ms]
    p.add_argument("--ops", nargs="+", help=f"ops, or op:mode; default all of {all_ops}")
    p.add_argument("--backends", nargs="+", help=f"from {impls.IMPLS}; default per device {impls.DEFAULT_IMPLS}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtypes", nargs="+", help=f"from {sorted(DTYPES)}; default fp32 bf16")
    p.add_argument("--T", nargs="+", type=int, help="rows (tokens); default CPU 1024 4096, GPU + 8192 32768")
    p.add_argument("--V", nargs="+", type=int, help="vocabulary sizes; default 32000 151936")
    p.add_argument("--out", type=Path, help="output path stem (default benchmarks/results/<device>-<date>[-quick])")
    p.add_argument("--check-rows", type=int, default=64, help="rows compared with the float64 oracle per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, all cores)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--note", default="", help="text for the report's Note section (e.g. why a target is missed)")
    p.add_argument("--no-fused-linear", action="store_true",
                   help="skip the fused output layer + loss benchmark (bench_fused_linear.py) that follows the sweep "
                        "(it is skipped anyway when --ops is given)")
    p.add_argument("--no-inplace", action="store_true",
                   help="skip the in-place backward benchmark (bench_inplace.py) that follows the sweep (skipped "
                        "anyway when --ops is given)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                "run on a GPU machine or use --device cpu")
    device = torch.device(a.device)
    backends = _split(a.backends) or list(impls.DEFAULT_IMPLS[device.type])
    dtypes = _split(a.dtypes) or ["fp32", "bf16"]
    for b in backends:
        if b not in impls.IMPLS:
            p.error(f"--backends: unknown {b!r}; choose from {impls.IMPLS}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown {d!r}; choose from {sorted(DTYPES)}")
    ops = _op_specs(_split(a.ops))
    Ts = tuple(a.T or (QUICK["T"] if a.quick else DEFAULT_T[device.type]))
    Vs = tuple(a.V or (QUICK["V"] if a.quick else DEFAULT_V))
    if min(Ts + Vs) < 1:
        p.error("--T and --V must be positive")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be positive")
    stem = a.out or common.REPO / "benchmarks" / "results" / (
        f"{common.device_slug(device)}-{common.today()}" + ("-quick" if a.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    policy = common.QUICK_POLICY if a.quick else TimingPolicy(warmup=1, min_reps=3, max_reps=30, target_s=0.4)
    return SweepConfig(device, Ts, Vs, tuple(dict.fromkeys(dtypes)), ops,
                       tuple(dict.fromkeys(backends)), policy, a.quick, stem, a.check_rows, a.seed,
                       not a.no_plot, a.note, a.threads, tuple(sys.argv[1:] if argv is None else argv),
                       fused_linear=not a.no_fused_linear and a.ops is None,
                       inplace=not a.no_inplace and a.ops is None)


# ------------------------------------------------------------------------------------------------ one case
@contextlib.contextmanager
def _silenced_stderr_fd():
    """The profiler's C++ side prints start/stop lines to file descriptor 2; keep them out of the log."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _dispatched_ops(fn) -> list[str]:
    """The opd ops (opd_C::* row kernels, opd_kernels::* custom ops) that one call runs, from the profiler."""
    with _silenced_stderr_fd(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if e.key.startswith(("opd_C::", "opd_kernels::"))})


def _check(cfg: SweepConfig, impl: str, op: str, mode: str, inputs, result) -> dict:
    verdict = impls.check(impl, op, mode, inputs, result, cfg.check_rows)
    if verdict is None:
        return {"check": None, "check_note": "no per-row values to compare (a batch-mean result)"}
    err, tol = verdict
    return {"max_rel_err": err, "check": "ok" if err <= tol else "FAIL",
            "check_note": f"max|out-ref|/max|ref| on {cfg.check_rows} rows vs float64, tolerance {tol:g}"}


def run_case(cfg: SweepConfig, inputs, op: str, mode: str, impl: str, bw: Bandwidth, load: ForeignLoad) -> dict:
    """Build, check, measure peak memory, then time one case. Never raises: failures become the row's error."""
    T, V = inputs.student.shape
    elt = inputs.student.element_size()
    row: dict = {"status": "ok"}
    reason = impls.unavailable_reason(impl, cfg.device)
    if reason is None:
        need = impls.estimated_extra_bytes(impl, op, mode, T, V, elt)
        free = (torch.cuda.mem_get_info(cfg.device)[0] + torch.cuda.memory_reserved(cfg.device)
                - torch.cuda.memory_allocated(cfg.device)  # blocks torch's caching allocator holds are free to it
                if cfg.device.type == "cuda" else psutil.virtual_memory().available)
        if need > 0.85 * free:
            reason = (f"needs ~{need / 2**30:.1f} GiB of temporaries, {free / 2**30:.1f} GiB free: skipped so the "
                      "sweep cannot run the machine out of memory")
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    try:
        fn = impls.build(impl, op, mode, inputs)
        t0 = time.perf_counter()
        result = fn()
        common.synchronize(cfg.device)
        row["first_call_s"] = time.perf_counter() - t0
        row.update(_check(cfg, impl, op, mode, inputs, result))
        del result
        if impl in impls.OPD_BACKENDS:
            row["dispatched"] = _dispatched_ops(fn)
            if impl in ("cpp", "cuda") and not any(k.startswith("opd_C::") for k in row["dispatched"]):
                row["warning"] = f"no opd_C kernel ran under backend {impl!r}: the op fell back to PyTorch code"
        mem, mem_call_s = _memory(cfg, fn, T * V * elt)
        row.update(mem)
        policy, prior = cfg.policy, ()
        if row["first_call_s"] > 0.5:   # slow cases: the calls above were warmup enough; the timed memory
            policy, prior = dataclasses.replace(policy, warmup=0), (mem_call_s,)  # call counts as a repeat
        n_samples = len(load.samples)
        with load.measure():
            timing = common.time_fn(fn, cfg.device, policy, prior)
        row["foreign_load"] = load.samples[-1] if len(load.samples) > n_samples else None
    except Exception as exc:  # noqa: BLE001  (a failing backend must not stop the sweep; the row says why)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        if impl == "liger":
            inputs.refill()   # Liger's cross entropy writes its gradient into its input
    return {**row, **_derived(op, mode, T, V, elt, timing, bw)}


def _memory(cfg: SweepConfig, fn, logits_bytes: int) -> tuple[dict, float]:
    if cfg.device.type == "cpu" and (why := common.cpu_peak_supported()) is not None:
        t0 = time.perf_counter()
        fn()
        return {"extra_mem_bytes": None, "extra_mem_note": why}, time.perf_counter() - t0
    peak, result, seconds = common.peak_extra_bytes(fn, cfg.device)
    extra = max(0, peak - common.storage_bytes(result))   # outputs (incl. the gradient) are required, not extra
    return {"extra_mem_bytes": extra, "extra_mem_pct_logits": 100.0 * extra / logits_bytes}, seconds


def _derived(op, mode, T, V, elt, timing: common.Timing, bw: Bandwidth) -> dict:
    nbytes = common.bytes_moved(op, mode, T, V, elt)
    gbps = nbytes / timing.median_s / 1e9
    floor = common.floor_seconds(op, mode, T, V, elt, bw)
    return {"time_ms": timing.median_s * 1e3, "time_min_ms": timing.min_s * 1e3, "reps": timing.reps,
            "bytes": nbytes, "gbps": gbps, "pct_copy": 100 * gbps / bw.copy_gbps,
            "pct_read": 100 * gbps / bw.read_gbps, "floor_ms": floor * 1e3, "x_floor": timing.median_s / floor}


# ------------------------------------------------------------------------------------------------ the sweep
def _add_speedups(rows: list[dict]) -> None:
    ok = {(r["op"], r["mode"], r["T"], r["V"], r["dtype"], r["backend"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["op"], r["mode"], r["T"], r["V"], r["dtype"])
        r["speedup_vs"] = {b: ok[key + (b,)]["time_ms"] / r["time_ms"] for b in impls.BASELINES if key + (b,) in ok}


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    started = time.perf_counter()
    load_start = os.getloadavg()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    machine = common.machine_record(cfg.device)   # before any work: the load average is still the others'
    load = ForeignLoad()
    probe_elems = (64 << 20) if cfg.quick else (256 << 20)   # fp32: 256 MiB / 1 GiB, far beyond any cache
    probe = torch.ones(probe_elems, device=cfg.device)
    with load.measure():
        bandwidth = common.probe_bandwidth(probe, cfg.policy)
    del probe
    log(f"device {machine['device_slug']} ({machine['gpu_name'] or machine['cpu_model']}): copy "
        f"{bandwidth.copy_gbps:.1f} GB/s, read ({bandwidth.read_op}) {bandwidth.read_gbps:.1f} GB/s; "
        f"load {load_start[0]:.2f}")
    rows, shapes = [], []
    total = len(cfg.Ts) * len(cfg.Vs) * len(cfg.dtypes) * len(cfg.ops) * len(cfg.impls)
    need_teacher = any(op == "reverse_kl" for op, _ in cfg.ops)
    for dtype in cfg.dtypes:
        for V in cfg.Vs:
            for T in cfg.Ts:
                rows_before = len(rows)
                inputs = impls.make_inputs(T, V, DTYPES[dtype], cfg.device, with_teacher=need_teacher, seed=cfg.seed)
                with load.measure():
                    bw = common.probe_bandwidth(inputs.student, cfg.policy)
                shapes.append({"T": T, "V": V, "dtype": dtype, **bw.as_dict()})
                for op, mode in cfg.ops:
                    for impl in cfg.impls:
                        row = {"op": op, "mode": mode, "T": T, "V": V, "dtype": dtype, "backend": impl,
                               "kind": "baseline" if impl in impls.BASELINES else "opd",
                               **run_case(cfg, inputs, op, mode, impl, bw, load)}
                        rows.append(row)
                        log(_progress(len(rows), total, row))
                assert len(rows) - rows_before == len(cfg.ops) * len(cfg.impls)
                del inputs
                gc.collect()
    _add_speedups(rows)
    load_end = os.getloadavg()
    record = {"schema": "opd-benchmarks/1", "created": common.now_iso(), "command": _command(cfg.argv),
              "config": cfg.as_dict(), "machine": machine, "bandwidth": bandwidth.as_dict(),
              "bandwidth_per_shape": shapes, "load": _load_record(load_start, load_end, load), "rows": rows,
              "duration_s": time.perf_counter() - started, "note": cfg.note}
    record["targets"] = report.evaluate_targets(record)
    return record


def _load_record(start, end, load: ForeignLoad) -> dict:
    reasons = []
    if start[0] > PROVISIONAL_LOAD:
        reasons.append(f"1-minute load average {start[0]:.2f} > {PROVISIONAL_LOAD} before the run")
    if (load.mean() or 0.0) > PROVISIONAL_FOREIGN:
        reasons.append(f"other processes used {load.mean():.2f} cores on average during the run "
                       f"(> {PROVISIONAL_FOREIGN})")
    return {"loadavg_start": list(start), "loadavg_end": list(end), "foreign_cpu_mean": load.mean(),
            "foreign_cpu_max": load.max(), "provisional": bool(reasons), "provisional_reasons": reasons}


def _progress(i: int, total: int, row: dict) -> str:
    head = f"[{i:3d}/{total}] {row['op']:<14} {row['mode']:<7} T={row['T']:<5} V={row['V']:<6} " \
           f"{row['dtype']:<4} {row['backend']:<8}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    mem = row.get("extra_mem_bytes")
    mem_s = "" if mem is None else f" +{mem / 2**20:.1f} MiB"
    return f"{head} {row['time_ms']:9.2f} ms {row['gbps']:7.1f} GB/s {row['pct_copy']:5.0f}% copy{mem_s}" + \
           (f"  [{row['check']}]" if row.get("check") == "FAIL" else "") + \
           (f"  WARNING: {row['warning']}" if row.get("warning") else "")


def _command(argv: tuple[str, ...]) -> str:
    return " ".join(["python -m benchmarks", *(a if a and " " not in a else repr(a) for a in argv)])


def write_outputs(record: dict, stem: Path, plot: bool) -> list[Path]:
    paths = [stem.parent / (stem.name + ".json"), stem.parent / (stem.name + ".md")]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(report.markdown(record))
    if plot:
        png = stem.parent / (stem.name + ".png")
        report.plot(record, png)
        paths.append(png)
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    record = run_sweep(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for path in write_outputs(record, cfg.out_stem, cfg.plot):
        print(path)
    failed = [r for r in record["rows"] if r["status"] == "error" or r.get("check") == "FAIL"]
    if cfg.fused_linear:
        from . import bench_fused_linear
        fl = bench_fused_linear.run(cfg.quick, cfg.device, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        stem = cfg.out_stem.parent / f"fused-linear-{cfg.out_stem.name}"
        for path in bench_fused_linear.write(fl, stem):
            print(path)
    if cfg.inplace:
        from . import bench_inplace
        ip = bench_inplace.run(cfg.quick, cfg.device, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        ip["command"] = _command(cfg.argv)
        failed += [r for r in ip["rows"] if r.get("check") == "FAIL"]
        for path in bench_inplace.write(ip, cfg.out_stem.parent / f"inplace-{cfg.out_stem.name}"):
            print(path)
    return 1 if failed else 0
