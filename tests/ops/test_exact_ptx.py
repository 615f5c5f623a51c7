"""The GPU kernels are exact by construction: no multiply-add is contracted into an fma (checked on the CPU).

The kernels' exact identities (z = x * inv_t rounded before z - max, so the max column gives exactly 0 and
identical rows give a KL of exactly 0; the TwoSum in ``two_diff``) need every product and sum rounded on its own.
Both compilers contract by default: nvcc's ``--fmad=true`` and Triton's fp fusion turn ``a * b + c`` into
``fma.rn.f32`` and leave the other products and sums as plain ``mul.f32`` / ``add.f32``, which ptxas fuses into FFMA
in the SASS. Built without contraction, every f32/f64 ``mul``/``add``/``sub`` in the PTX carries ``.rn`` (ptxas never
fuses those) and the only fmas left are the math library's explicit ones (inside expf / logf).

Each check compiles the real sources to PTX with the flags the build uses (nvcc: ``OPD_CUDA_EXACT_FLAGS`` from
CMakeLists.txt; Triton: ``opd_kernels.triton._common.EXACT``), and once with contraction on to show the check
would fail.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLAIN = re.compile(r"^\s*(?:@%p\d+\s+)?(?:mul|add|sub)(?:\.ftz)?\.f(?:32|64)\b", re.M)   # no rounding modifier
FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b")


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if pathlib.Path(p).exists()), None)


def _cmake_flags() -> list[str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    match = re.search(r"^set\(OPD_CUDA_EXACT_FLAGS ([^)]*)\)", text, re.M)
    assert match, "CMakeLists.txt must set(OPD_CUDA_EXACT_FLAGS ...) for the CUDA build and this check"
    return shlex.split(match.group(1))


def _nvcc_ptx(src: pathlib.Path, flags: list[str], tmp_path) -> str:
    out = tmp_path / f"{src.stem}.ptx"
    subprocess.run([_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", *flags, "-ptx", f"-I{ROOT / 'csrc'}", str(src),
                    "-o", str(out)], check=True, capture_output=True, timeout=300)
    return out.read_text()


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (install the CUDA toolkit or put its bin/ on PATH)")
@pytest.mark.parametrize("src", sorted((ROOT / "csrc" / "cuda").glob("*_kernels.cu")), ids=lambda p: p.name)
def test_cuda_ptx_has_no_contracted_multiply_add(src, tmp_path):
    exact = _nvcc_ptx(src, _cmake_flags(), tmp_path)
    plain = PLAIN.findall(exact)
    assert not plain, f"{src.name}: {len(plain)} unrounded mul/add/sub in the PTX (ptxas may fuse them into FFMA)"
    default = _nvcc_ptx(src, ["--fmad=true"], tmp_path)
    assert PLAIN.findall(default) and len(FMA.findall(default)) > len(FMA.findall(exact)), \
        "with --fmad=true the same source must show contractions (else this check cannot tell)"


def _triton_kernels():
    import triton
    from opd_kernels.triton import kl, logprob, opd
    for module in (kl, logprob, opd):
        for name, fn in sorted(vars(module).items()):
            if isinstance(fn, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                yield module, fn


CONST = {"INV_T": 1 / 0.7, "HAS_TOKENS": True, "SPLIT": True, "BLOCK_V": 1024, "SPLIT_BLOCK": 8,
         "WITH_ENTROPY": True, "HAS_ENTROPY": True, "KL_KIND": 3, "HAS_MASK": True}


def _signature(module, fn) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", CONST[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = {"tok_ptr": "*i64", "mask_ptr": "*i8"}.get(p.name, "*fp32")
            if p.name == "part_ptr" and module.__name__.endswith(".kl"):
                sig[p.name] = "*fp64"                                  # the KL's split states are float64
        else:
            sig[p.name] = "fp32" if p.name == "coef" else "i32"
    return sig, constexprs


def _triton_ptx(module, fn, options) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, constexprs = _signature(module, fn)
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8, **options})
    return compiled.asm["ptx"]


def triton_counts() -> dict:
    """{kernel: (plain mul/add/sub, fmas) with EXACT, the same with fp fusion on}: compiled outside the
    interpreter (the test session defines the kernels for TRITON_INTERPRET=1, so this runs in a subprocess)."""
    from opd_kernels.triton._common import EXACT
    counts = {}
    for module, fn in _triton_kernels():
        exact, fused = _triton_ptx(module, fn, EXACT), _triton_ptx(module, fn, {"enable_fp_fusion": True})
        counts[fn.__name__] = [len(PLAIN.findall(exact)), len(FMA.findall(exact)),
                               len(PLAIN.findall(fused)), len(FMA.findall(fused))]
    return counts


def test_triton_ptx_has_no_contracted_multiply_add():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(counts) >= 8, counts                                  # every launched kernel was compiled
    for name, (plain, fma, plain_fused, fma_fused) in counts.items():
        assert plain == 0, f"{name}: {plain} unrounded mul/add/sub in the PTX (ptxas may fuse them)"
        assert plain_fused or fma_fused > fma, f"{name}: fp fusion on shows no contraction (check cannot tell)"


def test_every_triton_launch_passes_exact():
    """The PTX check compiles with EXACT; this makes sure every launch site actually passes it."""
    import ast
    launches = []
    for path in sorted((ROOT / "opd_kernels" / "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel"):
                exact = any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "EXACT"
                            for k in node.keywords)
                launches.append((f"{path.name}:{node.lineno} {node.func.value.id}", exact))
    assert len(launches) >= 10, launches
    assert all(exact for _, exact in launches), [where for where, exact in launches if not exact]


if __name__ == "__main__":
    print(json.dumps(triton_counts()))
