"""Fused output layer + loss (``opd_kernels.fused_linear_logprobs``, chunked over tokens) vs the materialised path.

    python -m benchmarks.bench_fused_linear            # T=8192, V=49152, d=576 (SmolLM2-135M's head), fp32
    python -m benchmarks.bench_fused_linear --quick    # T=2048
(``python -m benchmarks`` runs it after the sweep.)

Both paths compute, from hidden states h [T, d] and the output weight W [V, d], the per-token log-probs and
entropies (the policy loss's inputs; "+kl": also the exact KL against a teacher's hidden states [T, d_t] and head
[V, d_t], the OPD loss) and the gradients w.r.t. h and W of a sum of them with random per-row weights:
- materialised: logits = h @ W.T ([T, V]), then ``opd_kernels.token_logprobs`` / ``reverse_kl`` (what the trainer
  did before), autograd through both;
- fused: ``opd_kernels.fused_linear_logprobs`` with its default chunk (rows * V * 4 bytes <= 64 MiB).
Peak extra memory = the peak resident memory of one forward + backward call above what was resident before it
(inputs, weights, teacher), minus the gradients both paths must return (grad_h [T, d] and grad_W [V, d]):
``common.peak_extra_bytes`` (the kernel's RSS high-water mark, reset before the call; CUDA: the allocator's
peak). Accuracy: max abs error of grad_h and grad_W against a float64 oracle (the materialised path in float64)
on a smaller T, next to PyTorch's own fp32 path (``fused_linear_reference`` in fp32: logits, log_softmax,
autograd); the rule is fused error <= 2 x PyTorch's + one fp32 ulp of the largest oracle value.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

import opd_kernels as ok
from opd_kernels.ops.fused_linear import default_chunk_rows, fused_linear_reference

from . import common

EPS32 = torch.finfo(torch.float32).eps


def make_inputs(T: int, V: int, d: int, d_t: int, dtype, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)  # noqa: E731
    # logits of a realistic spread: N(0, ~3^2) per entry (d-dimensional dot products of the scaled inputs)
    return {"h": rnd(T, d), "w": rnd(V, d, scale=3 / d ** 0.5), "th": rnd(T, d_t),
            "tw": rnd(V, d_t, scale=3 / d_t ** 0.5),
            "tokens": torch.randint(0, V, (T,), generator=gen).to(device),
            "ups": torch.randn(3, T, generator=gen).to(device)}


def _total(logp, entropy, kl, ups):
    total = (logp * ups[0]).sum() + (entropy * ups[1]).sum()
    return total if kl is None else total + (kl * ups[2]).sum()


def materialised(x: dict, with_kl: bool):
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    logits = h @ w.T
    logp, entropy = ok.token_logprobs(logits, x["tokens"], return_entropy=True)
    kl = ok.reverse_kl(logits, (x["th"] @ x["tw"].T).detach()) if with_kl else None
    return torch.autograd.grad(_total(logp, entropy, kl, x["ups"]), (h, w))


def fused(x: dict, with_kl: bool):
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    teacher = ok.LinearTeacher(x["th"], x["tw"]) if with_kl else None
    out = ok.fused_linear_logprobs(h, w, x["tokens"], return_entropy=True, teacher=teacher)
    return torch.autograd.grad(_total(out.logp, out.entropy, out.kl, x["ups"]), (h, w))


def pytorch_path(x: dict, with_kl: bool):
    """fused_linear_reference: plain PyTorch (float64 inputs: the oracle)."""
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    teacher = ok.LinearTeacher(x["th"], x["tw"]) if with_kl else None
    out = fused_linear_reference(h, w, x["tokens"], return_entropy=True, teacher=teacher)
    return torch.autograd.grad(_total(out.logp, out.entropy, out.kl, x["ups"].to(h.dtype)), (h, w))


def measure(fn, x: dict, with_kl: bool, device, reps: int) -> dict:
    """Peak extra bytes (gradients excluded) of the first call, and the median time of ``reps`` calls."""
    gc.collect()
    peak, grads, first = common.peak_extra_bytes(lambda: fn(x, with_kl), device)
    extra = max(0, peak - common.storage_bytes(grads))
    del grads
    times = [first]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        fn(x, with_kl)
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"extra_mem_bytes": extra, "time_s": sorted(times)[len(times) // 2], "times_s": times}


def accuracy(T: int, V: int, d: int, d_t: int, with_kl: bool, device) -> dict:
    """Max abs gradient errors vs the float64 oracle, and the 2x-PyTorch rule, at a smaller T."""
    x64 = make_inputs(T, V, d, d_t, torch.float64, device, seed=1)
    oracle = pytorch_path(x64, with_kl)
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x64.items()}
    res = {}
    for name, fn in (("fused", fused), ("materialised", materialised), ("pytorch_fp32", pytorch_path)):
        grads = fn({k: v.detach().clone() for k, v in x32.items()}, with_kl)
        res[name] = {g: float((a.double() - o).abs().max()) for g, a, o in zip(("grad_h", "grad_w"), grads, oracle)}
    floor = {g: EPS32 * float(o.abs().max()) for g, o in zip(("grad_h", "grad_w"), oracle)}
    res["rule_ok"] = all(res["fused"][g] <= 2 * res["pytorch_fp32"][g] + floor[g] for g in floor)
    return res


def run(quick: bool = False, device=torch.device("cpu"), with_kl=(False, True), log=print) -> dict:
    T, V, d, d_t = (2048 if quick else 8192), 49152, 576, 960
    reps = 1 if quick else 2
    record = {"schema": "opd-benchmarks/fused-linear/1", "created": common.now_iso(),
              "machine": common.machine_record(device), "T": T, "V": V, "d": d, "teacher_d": d_t, "dtype": "fp32",
              "chunk_rows": default_chunk_rows(V), "logits_bytes": T * V * 4, "loadavg_start": os.getloadavg(),
              "cases": []}
    for kl in with_kl:
        x = make_inputs(T, V, d, d_t, torch.float32, device)
        case = {"case": "logp+entropy" + ("+kl" if kl else "")}
        for name, fn in (("materialised", materialised), ("fused", fused)):
            case[name] = measure(fn, x, kl, device, reps)
            log(f"{case['case']:<18} {name:<12} +{case[name]['extra_mem_bytes'] / 2**20:9.1f} MiB "
                f"{case[name]['time_s']:8.2f} s")
        case["fused_mem_pct_of_materialised"] = 100 * case["fused"]["extra_mem_bytes"] / max(
            1, case["materialised"]["extra_mem_bytes"])
        case["accuracy"] = accuracy(256 if quick else 512, V, d, d_t, kl, device)
        record["cases"].append(case)
        del x
    record["target"] = "fused peak extra memory <= 5% of the materialised path's, gradients within the 2x rule"
    record["loadavg_end"] = os.getloadavg()   # the machine's load (2 cores: > 2 means the timings are shared)
    # the chunk is a fixed 64 MiB, so its share shrinks with T: the target is stated (and judged) at T = 8192
    record["target_met"] = None if quick else all(c["fused_mem_pct_of_materialised"] <= 5 and c["accuracy"]["rule_ok"]
                                                  for c in record["cases"])
    return record


def markdown(record: dict) -> str:
    lines = [f"# Fused linear + loss vs materialised logits ({record['machine']['device_slug']}, {record['created']})",
             "", f"T={record['T']}, V={record['V']}, d={record['d']} (teacher d={record['teacher_d']}), "
             f"{record['dtype']}, chunk {record['chunk_rows']} rows; logits would be "
             f"{record['logits_bytes'] / 2**20:.0f} MiB. Load average (1 min) at start / end: "
             f"{record['loadavg_start'][0]:.2f} / {record['loadavg_end'][0]:.2f} on "
             f"{record['machine']['cpu_count']} cores.", "",
             "| case | path | peak extra MiB | % of materialised | time s | max err grad_h | max err grad_W |",
             "|---|---|---|---|---|---|---|"]
    for c in record["cases"]:
        acc = c["accuracy"]
        for name in ("materialised", "fused"):
            m = c[name]
            pct = 100 * m["extra_mem_bytes"] / max(1, c["materialised"]["extra_mem_bytes"])
            lines.append(f"| {c['case']} | {name} | {m['extra_mem_bytes'] / 2**20:.1f} | {pct:.2f}% | "
                         f"{m['time_s']:.2f} | {acc[name]['grad_h']:.2e} | {acc[name]['grad_w']:.2e} |")
        lines.append(f"| {c['case']} | PyTorch fp32 (oracle check) | | | | {acc['pytorch_fp32']['grad_h']:.2e} | "
                     f"{acc['pytorch_fp32']['grad_w']:.2e} |")
    verdict = {True: "met", False: "MISSED", None: "not judged (stated for T=8192; this is a --quick run)"}
    lines += ["", f"Target ({record['target']}): {verdict[record['target_met']]}.", ""]
    return "\n".join(lines)


def write(record: dict, stem: Path) -> list[Path]:
    return common.write_record(record, stem, markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fused_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, help="output stem (default benchmarks/results/fused-linear-<device>-<date>)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    stem = a.out or common.REPO / "benchmarks" / "results" / (
        f"fused-linear-{common.device_slug(device)}-{common.today()}" + ("-quick" if a.quick else ""))
    record = run(a.quick, device, log=lambda m: print(m, file=sys.stderr, flush=True))
    for path in write(record, stem):
        print(path)
    return 1 if record["target_met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
