"""Turn a sweep record into the markdown table, the target verdicts and the PNG plot."""
from __future__ import annotations

from pathlib import Path

from .impls import BASELINES

FUSED = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# CPU targets (issue 6): speed vs naive and vs the best of chunked / torch.compile, extra memory, and for the
# forward ops closeness to one plain read pass of the logits (fwd+bwd must also write the gradient: its
# `x floor` against a copy is reported, not judged).
CPU_TARGETS = (("vs naive", ">=", 10.0), ("vs best(chunked, compile)", ">=", 1.5),
               ("extra mem % logits", "<", 1.0))
CPU_FWD_TARGETS = (("x read pass", "<=", 1.3),)
# GPU targets (issue 6): % of the copy bandwidth at bf16, V=151936, T=8192.
GPU_SHAPE = {"T": 8192, "V": 151936, "dtype": "bf16"}
GPU_TARGETS = {("token_logprobs", "fwd"): 90.0, ("opd_advantages", "fwd"): 90.0, ("reverse_kl", "fwd"): 80.0}


def _metric(row: dict, name: str) -> float | None:
    s = row.get("speedup_vs", {})
    if name == "vs naive":
        return s.get("naive")
    if name == "vs best(chunked, compile)":
        vals = [s[b] for b in ("chunked", "compile") if b in s]
        return min(vals) if vals else None
    if name == "x read pass":
        return row.get("x_floor") if row["mode"] == "fwd" else None
    if name == "extra mem % logits":
        return row.get("extra_mem_pct_logits")
    if name == "% copy":
        return row.get("pct_copy")
    raise KeyError(name)


def _verdict(value: float, op: str, goal: float) -> tuple[bool, str]:
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    if met:
        return True, ""
    if op == ">=":
        return False, f"{goal / value:.2f}x short" if value > 0 else "no speed-up"
    return False, f"{value / goal:.2f}x over"


def evaluate_targets(record: dict) -> list[dict]:
    """One verdict per (fused row, target): the value, met or not, and by how much it is missed."""
    device = record["machine"]["device"]
    out = []
    for row in record["rows"]:
        if row["status"] != "ok" or row["backend"] not in FUSED.get(device, ()):
            continue
        key = {k: row[k] for k in ("op", "mode", "T", "V", "dtype", "backend")}
        if device == "cpu":
            targets = CPU_TARGETS + (CPU_FWD_TARGETS if row["mode"] == "fwd" else ())
        elif all(row[k] == v for k, v in GPU_SHAPE.items()) and (row["op"], row["mode"]) in GPU_TARGETS:
            targets = (("% copy", ">=", GPU_TARGETS[(row["op"], row["mode"])]),)
        else:
            continue
        for name, op, goal in targets:
            value = _metric(row, name)
            if value is None:
                out.append({**key, "target": f"{name} {op} {goal:g}", "value": None, "met": None,
                            "missed_by": "not measured (baseline missing or skipped)"})
                continue
            met, missed = _verdict(value, op, goal)
            out.append({**key, "target": f"{name} {op} {goal:g}", "value": value, "met": met, "missed_by": missed})
    return out


# ------------------------------------------------------------------------------------------------ markdown
def _f(v, fmt="{:.1f}", none="—") -> str:
    return none if v is None else fmt.format(v)


def _header(rec: dict) -> list[str]:
    m, load, bw, v, g = rec["machine"], rec["load"], rec["bandwidth"], rec["machine"]["versions"], \
        rec["machine"]["git"]
    device = m["gpu_name"] or m["cpu_model"]
    lines = [f"# opd kernel benchmarks: {m['device_slug']} ({device}), {rec['created']}", ""]
    if load["provisional"]:
        lines += [f"> **PROVISIONAL**: measured on a loaded machine ({'; '.join(load['provisional_reasons'])}). "
                  "Rerun the command below on a quiet machine for final numbers.", ""]
    mods = g["modified_kernel_or_benchmark_files"]
    lines += [
        f"- command: `{rec['command']}` ({rec['duration_s']:.0f} s)",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs ({m['cpu_capability']}), torch threads "
        f"{m['torch_threads']}, {m['memory_gib']} GiB" + (f"; GPU {m['gpu_name']}" if m["gpu_name"] else ""),
        f"- versions: torch {v['torch']}, triton {v['triton']}, liger-kernel {v['liger_kernel']}, python "
        f"{v['python']}; opd commit `{(g['commit'] or '?')[:12]}`"
        + (f" with uncommitted changes in {', '.join(mods)}" if mods else "")
        + f"; op library built {rec['machine'].get('opd_library', {}).get('built')}",
        f"- load: 1-min load average {load['loadavg_start'][0]:.2f} before, {load['loadavg_end'][0]:.2f} after; "
        f"other processes used {_f(load['foreign_cpu_mean'], '{:.2f}')} cores on average "
        f"(max {_f(load['foreign_cpu_max'], '{:.2f}')}) while cases ran",
        f"- memory bandwidth (same run, {bw['nbytes'] / 2**20:.0f} MiB fp32 buffer): copy "
        f"{bw['copy_gbps']:.1f} GB/s (read + write bytes), read pass ({bw['read_op']}) {bw['read_gbps']:.1f} GB/s",
        "", "Per-shape bandwidth, measured on the student logits of each shape (the rows below use these):", "",
        "| T | V | dtype | logits MiB | copy GB/s | read GB/s |", "|---:|---:|---|---:|---:|---:|"]
    for s in rec["bandwidth_per_shape"]:
        lines.append(f"| {s['T']} | {s['V']} | {s['dtype']} | {s['nbytes'] / 2**20:.0f} | {s['copy_gbps']:.1f} | "
                     f"{s['read_gbps']:.1f} |")
    return lines + [""]


def _targets_table(rec: dict) -> list[str]:
    targets = rec.get("targets") or []
    if not targets:
        return []
    met = sum(1 for t in targets if t["met"])
    lines = [f"## Targets ({met}/{len(targets)} met)", "",
             "| op | mode | T | V | dtype | backend | target | value | met | missed by |",
             "|---|---|---:|---:|---|---|---|---:|---|---|"]
    for t in targets:
        mark = {True: "yes", False: "**no**", None: "?"}[t["met"]]
        lines.append(f"| {t['op']} | {t['mode']} | {t['T']} | {t['V']} | {t['dtype']} | {t['backend']} | "
                     f"{t['target']} | {_f(t['value'], '{:.2f}')} | {mark} | {t['missed_by']} |")
    return lines + [""]


def _case_tables(rec: dict) -> list[str]:
    lines = []
    baselines = [b for b in BASELINES if b in rec["config"]["impls"]]
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in rec["rows"]))
    for op, mode in keys:
        lines += [f"## {op} ({'forward' if mode == 'fwd' else 'forward + backward'})", "",
                  "| T | V | dtype | backend | median ms | GB/s | % copy | % read | x floor | extra MiB (% logits) | "
                  + " | ".join(f"vs {b}" for b in baselines) + " | check |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(baselines) + "---|"]
        for r in (r for r in rec["rows"] if (r["op"], r["mode"]) == (op, mode)):
            head = f"| {r['T']} | {r['V']} | {r['dtype']} | {r['backend']} |"
            if r["status"] != "ok":
                lines.append(f"{head} {r['status']}: {r['reason']} |" + " |" * (6 + len(baselines)))
                continue
            mem = r.get("extra_mem_bytes")
            mem_s = "—" if mem is None else f"{mem / 2**20:.1f} ({r['extra_mem_pct_logits']:.1f}%)"
            speed = " | ".join(_f(r["speedup_vs"].get(b), "{:.2f}x") for b in baselines)
            check = r.get("check") or "—"
            if r.get("warning"):
                check += f" ⚠ {r['warning']}"
            lines.append(f"{head} {r['time_ms']:.2f} | {r['gbps']:.1f} | {r['pct_copy']:.0f} | {r['pct_read']:.0f} | "
                         f"{r['x_floor']:.2f} | {mem_s} | {speed} | {check} |")
        lines.append("")
    return lines


def markdown(rec: dict) -> str:
    lines = _header(rec) + _targets_table(rec) + _case_tables(rec)
    lines += ["Columns: see benchmarks/README.md. `vs X` = time of X / time of this row (> 1: this row is faster). "
              "`x floor` = time / (one read pass over every logits matrix, or one copy of the student logits for "
              "fwd+bwd). Extra memory excludes inputs and the required outputs (incl. the gradient)."]
    if rec.get("note"):
        lines += ["", "## Note", "", rec["note"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plot
def plot(rec: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rec["rows"] if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["op"], r["mode"]) for r in rec["rows"]))
    backends = list(dict.fromkeys(r["backend"] for r in rec["rows"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (op, mode) in zip(axes[:, 0], panels):
        shapes = list(dict.fromkeys((r["T"], r["V"], r["dtype"]) for r in rec["rows"]
                                    if (r["op"], r["mode"]) == (op, mode)))
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            vals = {(r["T"], r["V"], r["dtype"]): r["gbps"] for r in ok
                    if (r["op"], r["mode"], r["backend"]) == (op, mode, b)}
            ax.bar([i + j * width for i in range(len(shapes))], [vals.get(s, 0.0) for s in shapes], width, label=b)
        ax.axhline(rec["bandwidth"]["copy_gbps"], color="k", ls="--", lw=1, label="copy")
        ax.axhline(rec["bandwidth"]["read_gbps"], color="gray", ls=":", lw=1, label="read pass")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], [f"{t}x{v}\n{d}" for t, v, d in shapes],
                      fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} ({mode})", fontsize=10)
    axes[0, 0].legend(fontsize=8, ncol=len(backends) + 2, loc="upper right")
    title = f"{rec['machine']['device_slug']} {rec['created'][:10]}" + \
            (" (PROVISIONAL: loaded machine)" if rec["load"]["provisional"] else "")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
