"""The benchmark machinery works: the sweep runs end to end on a tiny shape and writes a valid record, table and
plot; the memory meter sees an allocation of known size; the chunked baselines are right across chunk borders;
target verdicts say by how much a target is missed. No timing assertions (CI machines are shared)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder of the repo, not an installed package

from benchmarks import common, impls, report  # noqa: E402
from benchmarks import sweep as sweep_mod  # noqa: E402

ROW_KEYS = {"op", "mode", "T", "V", "dtype", "backend", "kind", "status"}
OK_KEYS = {"time_ms", "gbps", "pct_copy", "pct_read", "x_floor", "bytes", "extra_mem_bytes", "check",
           "speedup_vs", "reps"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    stem = tmp_path_factory.mktemp("bench") / "tiny"
    cmd = [sys.executable, "-m", "benchmarks", "--T", "8", "--V", "300", "--dtypes", "fp32", "bf16",
           "--ops", "token_logprobs", "opd_advantages", "reverse_kl:fwd+bwd",
           "--backends", "cpp", "torch", "naive", "chunked", "--out", str(stem), "--note", "smoke test"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stem, json.loads(stem.with_name("tiny.json").read_text()), proc


def test_sweep_writes_a_complete_record(sweep):
    _, rec, _ = sweep
    assert rec["schema"] == "opd-benchmarks/1"
    assert rec["machine"]["cpu_model"] and rec["machine"]["versions"]["torch"] == torch.__version__
    assert rec["machine"]["git"]["commit"] is None or len(rec["machine"]["git"]["commit"]) == 40
    assert len(rec["load"]["loadavg_start"]) == 3 and isinstance(rec["load"]["provisional"], bool)
    assert rec["bandwidth"]["copy_gbps"] > 0 and rec["bandwidth"]["read_gbps"] > 0
    assert [(s["T"], s["V"], s["dtype"]) for s in rec["bandwidth_per_shape"]] == [(8, 300, "fp32"), (8, 300, "bf16")]
    # 2 dtypes x (token fwd, token fwd+bwd, opd fwd, kl fwd+bwd) x 4 backends
    assert len(rec["rows"]) == 2 * 4 * 4
    for row in rec["rows"]:
        assert ROW_KEYS <= row.keys()
        if row["backend"] == "cpp" and row["status"] == "skipped":
            assert row["reason"]  # unavailable here: the row says why
            continue
        assert row["status"] == "ok", row
        assert OK_KEYS <= row.keys(), row
        assert row["time_ms"] > 0 and row["gbps"] > 0 and row["check"] == "ok"
        elt = 4 if row["dtype"] == "fp32" else 2
        assert row["bytes"] == common.bytes_moved(row["op"], row["mode"], 8, 300, elt)
        assert row["speedup_vs"]["naive"] > 0 and row["speedup_vs"]["chunked"] > 0
        assert "warning" not in row, row  # e.g. backend cpp ran no opd_C kernel
    naive = [r for r in rec["rows"] if r["backend"] == "naive"]
    assert all(r["speedup_vs"]["naive"] == 1.0 for r in naive)
    torch_rows = [r for r in rec["rows"] if r["backend"] == "torch"]
    assert all(any(k.startswith("opd_kernels::") for k in r["dispatched"]) for r in torch_rows)


def test_sweep_writes_table_and_plot(sweep):
    stem, rec, proc = sweep
    md = stem.with_name("tiny.md").read_text()
    for heading in ("## token_logprobs (forward)", "## token_logprobs (forward + backward)",
                    "## opd_advantages (forward)", "## reverse_kl (forward + backward)", "## Note"):
        assert heading in md
    assert "| T | V | dtype | backend | median ms | GB/s | % copy |" in md
    assert stem.with_name("tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(stem.with_name("tiny.json")) in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--backends", "bogus"], "unknown 'bogus'"), (["--ops", "nope"], "unknown op 'nope'"),
    (["--ops", "opd_advantages:fwd+bwd"], "opd_advantages has modes ['fwd']"),
    (["--dtypes", "int8"], "unknown 'int8'"), (["--T", "0"], "must be positive")])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        sweep_mod.parse_args([*args, "--out", str(tmp_path / "sub" / "x")])
    assert needle in str(exc.value.code) + capsys.readouterr().err
    assert not (tmp_path / "sub").exists()


def test_memory_meter_sees_a_known_allocation():
    if (why := common.cpu_peak_supported()) is not None:
        pytest.skip(why)
    x = torch.randn(1 << 20)
    x.sum()
    quiet, _, _ = common.peak_extra_bytes(lambda: x.sum(), torch.device("cpu"))
    assert quiet < (2 << 20)
    # a 64 MiB temporary, freed before the call returns, must show up in the high-water mark
    peak, out, seconds = common.peak_extra_bytes(lambda: torch.ones(16 << 20).sum(), torch.device("cpu"))
    assert (62 << 20) < peak < (80 << 20)
    assert common.storage_bytes(out) == 4 and seconds > 0


@pytest.mark.parametrize("op,mode", [("token_logprobs", "fwd"), ("token_logprobs", "fwd+bwd"),
                                     ("opd_advantages", "fwd"), ("reverse_kl", "fwd"), ("reverse_kl", "fwd+bwd")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_baseline_is_right_across_chunk_borders(monkeypatch, op, mode, dtype):
    monkeypatch.setitem(impls.CHUNK_BYTES, "cpu", 3 * 4 * 257)  # 3 rows per chunk: 11 rows = 4 chunks, one short
    inputs = impls.make_inputs(11, 257, dtype, torch.device("cpu"), with_teacher=True, seed=3)
    for impl in ("chunked", "naive"):
        err, tol = impls.check(impl, op, mode, inputs, impls.build(impl, op, mode, inputs)(), rows=11)
        assert err <= tol, (impl, err, tol)


def test_targets_say_by_how_much_they_are_missed():
    row = {"op": "token_logprobs", "mode": "fwd", "T": 4096, "V": 32000, "dtype": "fp32", "backend": "cpp",
           "status": "ok", "speedup_vs": {"naive": 5.0, "chunked": 2.0, "compile": 1.2}, "x_floor": 1.1,
           "extra_mem_pct_logits": 3.0}
    rec = {"machine": {"device": "cpu"}, "rows": [row, {**row, "backend": "naive"}]}
    got = {t["target"]: t for t in report.evaluate_targets(rec)}
    assert got["vs naive >= 10"]["met"] is False and got["vs naive >= 10"]["missed_by"] == "2.00x short"
    assert got["vs best(chunked, compile) >= 1.5"]["value"] == 1.2
    assert got["vs best(chunked, compile) >= 1.5"]["missed_by"] == "1.25x short"
    assert got["x read pass <= 1.3"]["met"] is True
    assert got["extra mem % logits < 1"]["missed_by"] == "3.00x over"
    assert len(got) == 4  # baseline rows get no verdicts
    rec["rows"] = [{**row, "mode": "fwd+bwd"}]  # must also write the gradient: no read-pass target
    assert {t["target"] for t in report.evaluate_targets(rec)} == set(got) - {"x read pass <= 1.3"}
    gpu = {**row, "backend": "cuda", "T": 8192, "V": 151936, "dtype": "bf16", "pct_copy": 85.0}
    verdicts = report.evaluate_targets({"machine": {"device": "cuda"}, "rows": [gpu, {**gpu, "T": 4096}]})
    assert [(v["target"], v["met"], v["missed_by"]) for v in verdicts] == [("% copy >= 90", False, "1.06x short")]
