"""The kernels' sm_90 builds keep the properties their speed rests on, checked without a GPU by
benchmarks/kernel_audit.py (Triton's bundled ptxas / cuobjdump) on a representative subset:
the int4 GEMV and GEMM, prefill and decode attention at the Gemma-2-2B shape, in bf16."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audit():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_audit.py"), "--quick", "--json", "--jobs", "2"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def builds(audit, kernel):
    rows = [b for b in audit["builds"] if b["kernel"] == kernel]
    assert rows, f"no {kernel} build audited"
    return rows


def test_every_kernel_family_is_audited(audit):
    kernels = {b["kernel"] for b in audit["builds"]}
    assert {"_int4_gemv_kernel", "_int4_mm_kernel", "_attn_prefill_kernel", "_attn_decode_kernel"} <= kernels


def test_no_spills_and_it_fits(audit):
    for b in audit["builds"]:
        assert b["spill_stack"] == 0 and b["local_mem_ops"] == 0, f"{b['label']} spills"
        assert b["registers"] <= 255 and b["shared"] <= 227 * 1024, b["label"]


def test_int4_weight_loads_are_wide_pipelined_and_i2f_free(audit):
    for kernel in ("_int4_gemv_kernel", "_int4_mm_kernel"):
        for b in builds(audit, kernel):
            loop, loads = b["main_loop"], b["weight_loads"]
            assert loop["i2f"] == 0, f"{b['label']}: {loop['i2f']} I2F in the main loop"
            assert loads["total"] > 0 and loads["share_128bit"] >= 0.8, f"{b['label']}: weight loads {loads}"
            assert min(int(w) for w in loads["by_width"]) >= 8, f"{b['label']}: weight loads narrower than 64 bits"
            assert loop["ldgsts"] > 0 and b["min_wait_in_flight"] >= 1, f"{b['label']}: weight loads not pipelined"


def test_prefill_keeps_two_stages_in_flight(audit):
    for b in builds(audit, "_attn_prefill_kernel"):
        assert b["async_waits_in_loops"] and b["min_wait_in_flight"] >= 2, f"{b['label']}: waits {b['async_waits_in_loops']}"
        assert b["main_loop"]["hgmma"] > 0, "prefill runs on wgmma"


def test_decode_loop_is_pipelined(audit):
    for b in builds(audit, "_attn_decode_kernel"):
        assert b["main_loop"]["ldgsts"] > 0 and b["min_wait_in_flight"] >= 1, b["label"]


def test_offsets_are_int64(audit):
    for b in audit["builds"]:
        assert b["int64_strides"], f"{b['label']}: no stride checked"
        narrow = [k for k, ok in b["int64_strides"].items() if not ok]
        assert not narrow, f"{b['label']}: {narrow} multiplied in int32"


def test_estimates_cover_the_goals(audit):
    """The estimates exist for the goal shapes on both machines (whether they meet the goals is
    recorded in benchmarks/RESULTS.md, not asserted: they are estimates)."""
    goals = audit["goals_met"]
    for what in ("int4 M=1 K=N=4096 G=32", "prefill T=8192", "decode B=1 S=32768"):
        for machine in ("H100", "H200"):
            assert any(k.startswith(what) and k.endswith(machine) for k in goals), (what, machine, list(goals))
