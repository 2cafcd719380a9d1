"""Ahead-of-time compile checks (no GPU needed): a few of the dispatcher's launch configurations
compile for sm_90 with the Triton wheel's ptxas and spill no registers; the occupancy arithmetic
and the ptxas log parser on known values.

The compiles run in a subprocess without TRITON_INTERPRET (this test process may have the Triton
interpreter on, which replaces the kernels); Triton's own cache is bypassed, so each run compiles.
"""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoflap_fast.bench import aot

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None
PTXAS = aot.triton_ptxas(90) if HAVE_TRITON else None
NO_PTXAS = "the Triton wheel has no ptxas (triton/backends/nvidia/bin)"
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason=NO_PTXAS if HAVE_TRITON else "triton is not installed")


def _report(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aot_report.py"), "--out", str(out), "--quiet", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, f"aot_report failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    with out.open() as f:
        return list(csv.DictReader(f))


@needs_ptxas
def test_triton_kernels_compile_for_hopper_without_spills(tmp_path):
    # the narrowest and the widest rows of the table: radix and bisect, 2:4, scores, norms
    shapes = "1024x4096,8192x28672"
    rows = _report(
        tmp_path, "--arch", "sm_90", "--shapes", shapes, "--dtypes", "bfloat16", "--patterns", "unstructured,2:4",
        "--kernels", "triton", "--fail-on-spill", "--act-tokens", "2048",
    )  # fmt: skip
    kinds = {(r["kernel"], r["variant"]) for r in rows}
    assert {("row_select", "bisect"), ("row_select", "radix"), ("row_select", "radix->bisect")} <= kinds
    assert {("nm_select", "-"), ("scores", "-"), ("col_sq_norms", "-")} <= kinds
    for r in rows:
        where = f"{r['kernel']} {r['variant']} {r['mode']} {r['rows']}x{r['cols']}"
        assert int(r["spill_bytes"]) == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < int(r["regs"]) <= 255, where
        assert 0 < float(r["occupancy"]) <= 1, where
        assert r["arch"] == "sm_90" and int(r["ctas_per_sm"]) >= 1, where
    # the report compiled what the launcher launches: same warps and blocks as row_select_launch
    from ecoflap_fast.kernels import select

    for cols, variant in [(4096, "radix"), (28672, "bisect")]:
        w = torch.empty(8, cols, dtype=torch.bfloat16, device="meta")
        launch = select.row_select_launch(
            w, torch.empty(cols, device="meta"), w, w, cols // 2, use_abs=True, scaled=True, prune=True, variant=variant
        )
        got = [r for r in rows if r["kernel"] == "row_select" and r["variant"] == variant and int(r["cols"]) == cols]
        assert got and all(int(r["num_warps"]) == launch.num_warps for r in got)
        assert all(f"BLOCK_N={launch.constexprs['BLOCK_N']}" in r["config"] for r in got)
        assert all(int(r["passes_per_row"]) == launch.passes for r in got)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@needs_ptxas
def test_cuda_kernels_compile_without_spills(tmp_path):
    rows = _report(tmp_path, "--arch", "sm_90", "--shapes", "4096x4096", "--kernels", "cuda", "--fail-on-spill")
    names = {r["kernel"] for r in rows}
    assert {"cuda:pack_24_kernel", "cuda:unpack_24_kernel", "cuda:rowwise_kernel<GATHER>"} <= names
    assert all(int(r["spill_bytes"]) == 0 and int(r["regs"]) > 0 for r in rows)


def test_occupancy_rules():
    h100 = aot.ARCHS["sm_90"]
    assert aot.occupancy(h100, 64, 0, 8) == (4, 0.5, "regs")  # 64 regs x 256 threads = 16K per CTA
    assert aot.occupancy(h100, 128, 512, 16) == (1, 0.25, "regs")
    assert aot.occupancy(h100, 72, 4096, 4)[0] == 7  # 2304 registers per warp: 7 warps per sub-partition
    assert aot.occupancy(h100, 16, 0, 4) == (16, 1.0, "warps")
    assert aot.occupancy(h100, 16, 0, 1) == (32, 0.5, "ctas")
    assert aot.occupancy(h100, 32, 100 * 1024, 4)[0:3:2] == (2, "smem")  # (100 KB + 1 KB reserved) x 2
    assert aot.occupancy(aot.ARCHS["sm_80"], 32, 100 * 1024, 4)[0] == 1  # 164 KB per SM on A100


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_row_bisect_kernel' for 'sm_90a'
ptxas info    : Function properties for _row_bisect_kernel
    112 bytes stack frame, 108 bytes spill stores, 172 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 112 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 400 bytes cmem[0]
"""
    info = aot.parse_ptxas(log)
    assert info["_row_bisect_kernel"] == dict(regs=128, stack=112, spill_st=108, spill_ld=172, smem=1024)
    assert info["other"] == dict(regs=24, stack=0, spill_st=0, spill_ld=0, smem=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not available")
def test_gpu_run_script_stops_at_once_without_a_gpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    before = set((ROOT / "benchmarks" / "results").iterdir())
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA GPU" in res.stdout and "nothing was run" in res.stdout
    assert set((ROOT / "benchmarks" / "results").iterdir()) == before  # wrote nothing
