"""Static audit of the Triton kernels' sm_90 builds, on a CPU: no GPU needed.

  python benchmarks/kernel_audit.py            # table: every GPU config, then the ESTIMATES per benchmark shape
  python benchmarks/kernel_audit.py --json     # the same figures as JSON
  python benchmarks/kernel_audit.py --quick    # the representative subset the CI test compiles

Triton 3.9 bundles ptxas and cuobjdump. Every configuration that the launchers pick on CUDA for the
benchmark shapes of benchmarks/kernels.py (and the other dtypes) is compiled for sm_90 and read back:

- `cuobjdump -res-usage`: registers, spill stack, shared memory;
- `cuobjdump -sass`: the main loop (the backward branch whose body holds the matrix instructions, or
  the most loads) and, per iteration and warp, its instruction count, MUFU, I2F*, HGMMA (wgmma) and
  HMMA (mma.sync), global loads (LDG) and async copies (LDGSTS) by width, local memory (spills);
- the TTGIR: `ttg.async_wait {num = N}` inside loops, i.e. how many copies stay in flight;
- the PTX with its line table: the loads that come from a given source line (the int4 weight load),
  by width.

From those counts and the launch grid, a roofline ESTIMATE per benchmark shape for H100 and H200
(see `Machine` and `estimate_*` for the model and its assumptions). Estimates are not measurements:
benchmarks/kernels.py measures when a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

# ---------------------------------------------------------------------------------------- machines


@dataclasses.dataclass(frozen=True)
class Machine:
    """Datasheet figures (SXM parts). The SM clock is the one the datasheet's dense bf16 figure
    implies (989.4 TFLOP/s = 132 SMs x 4,096 FLOP/clk x 1.83 GHz)."""

    name: str
    sms: int = 132
    clock_ghz: float = 1.83
    hbm_tbs: float = 3.35
    bf16_tflops: float = 989.4
    l2_mb: float = 50.0
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    # model assumptions (not datasheet): memory latency under load, and per-launch overhead in a
    # CUDA graph (launch + first wave ramp + tail drain)
    latency_ns: float = 700.0
    launch_us: float = 1.0

    @property
    def bytes_per_clk_sm(self) -> float:
        return self.hbm_tbs * 1e12 / (self.sms * self.clock_ghz * 1e9)


MACHINES = (Machine("H100", hbm_tbs=3.35), Machine("H200", hbm_tbs=4.8, l2_mb=50.0))
ISSUE_PER_CLK_SM = 4  # one warp instruction per clock per sub-partition
MUFU_LANES_PER_CLK_SM = 16
TENSOR_FLOP_PER_CLK_SM = 4096  # dense bf16 / fp16


# ---------------------------------------------------------------------------------------- compile


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@dataclasses.dataclass
class Build:
    kernel: str
    label: str
    consts: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_stack: int
    local: int
    shared: int
    sass: str
    ttgir: str
    ptx: str
    source: list  # the kernel file's lines, for the PTX line table
    source_name: str


def compile_config(fn, types: dict, consts: dict, unit_strides, num_warps: int, num_stages: int, label: str = "") -> Build:
    """Compile one kernel configuration for sm_90a, typed as a JIT launch on contiguous tensors
    specializes it: unit strides become constants, pointers and other ints are 16-divisible."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = dict(consts, **{n: 1 for n in unit_strides})
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and sig[n] not in ("fp32", "i64") and n not in types.get("_nodiv", ())}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    src_file = inspect.getsourcefile(fn.fn if hasattr(fn, "fn") else fn)
    return Build(kernel=fn.__name__, label=label, consts={k: v for k, v in consts.items() if k.isupper()},
                 num_warps=num_warps, num_stages=num_stages, registers=int(fields["REG"]),
                 spill_stack=int(fields["STACK"]), local=int(fields.get("LOCAL", 0)), shared=kernel.metadata.shared,
                 sass=sass, ttgir=kernel.asm["ttgir"], ptx=kernel.asm["ptx"],
                 source=Path(src_file).read_text().splitlines(), source_name=Path(src_file).name)


# ---------------------------------------------------------------------------------------- SASS

_SASS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)")


def sass_instructions(sass: str):
    """[(address, opcode, text)] of the first function in a cuobjdump -sass listing."""
    out = []
    for line in sass.splitlines():
        m = _SASS.match(line)
        if m:
            text = m.group(2).strip()
            words = text.split()
            op = words[1] if words[0].startswith("@") else words[0]
            out.append((int(m.group(1), 16), op, text))
    return out


def _loop_stats(body):
    ops = Counter(op for _, op, _ in body)
    n = sum(ops.values())

    def count(pred):
        return sum(c for op, c in ops.items() if pred(op))

    def width(op):  # bytes of a global load / async copy
        for w, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
            if w in op:
                return b
        return 4

    loads = [(op, width(op)) for _, op, _ in body if op.startswith("LDG") and not op.startswith("LDGDEPBAR")
             or op.startswith("LDGSTS")]
    n_loads = len(loads)
    wide = sum(1 for _, b in loads if b == 16)
    bytes_all = sum(b for _, b in loads)
    return dict(
        instructions=n, mufu=count(lambda o: o.startswith("MUFU")), i2f=count(lambda o: o.startswith("I2F")),
        hgmma=count(lambda o: o.startswith("HGMMA")), hmma=count(lambda o: o.startswith("HMMA")),
        ffma=count(lambda o: o in ("FFMA", "FMUL", "FADD") or o.startswith("FFMA")),
        ldg=count(lambda o: o.startswith("LDG") and not o.startswith("LDGSTS") and not o.startswith("LDGDEPBAR")),
        ldgsts=count(lambda o: o.startswith("LDGSTS")), lds=count(lambda o: o.startswith("LDS")),
        sts=count(lambda o: o.startswith("STS")), bar=count(lambda o: o.startswith("BAR")),
        local_mem=count(lambda o: o.startswith("LDL") or o.startswith("STL")),
        global_loads=n_loads, loads_128bit=wide, load_bytes=bytes_all,
        share_128bit=(wide / n_loads) if n_loads else None,
        share_128bit_bytes=(16 * wide / bytes_all) if bytes_all else None,
        top=", ".join(f"{op} {c}" for op, c in ops.most_common(8)),
    )


def sass_loops(sass: str) -> list[dict]:
    """Every innermost-or-not loop (a backward branch) with its per-iteration instruction mix."""
    ins = sass_instructions(sass)
    loops = []
    for addr, op, text in ins:
        m = _BRA.search(text)
        if m and op.startswith("BRA"):
            target = int(m.group(1), 16)
            if target < addr:
                body = [x for x in ins if target <= x[0] <= addr]
                stats = _loop_stats(body)
                stats.update(start=hex(target), end=hex(addr))
                loops.append(stats)
    return loops


def main_loop(loops: list[dict]) -> dict | None:
    """The loop with the most matrix instructions; without any (FMA kernels), the one with the most
    async copies (the pipelined stream), then the most global loads, then the largest."""
    if not loops:
        return None
    return max(loops, key=lambda s: (s["hgmma"] + s["hmma"], s["ldgsts"], s["global_loads"], s["instructions"]))


# ---------------------------------------------------------------------------------------- TTGIR / PTX


def _in_loops(ttgir: str, op: str, attr: str) -> list[int]:
    """The integer attribute `attr` of every `op` inside a scf.for body."""
    found, depth_stack, depth = [], [], 0
    for line in ttgir.splitlines():
        opens, closes = line.count("{"), line.count("}")
        if "scf.for" in line:
            depth_stack.append(depth)
        if op in line and depth_stack:
            m = re.search(rf"{attr} = (\d+)", line)
            if m:
                found.append(int(m.group(1)))
        depth += opens - closes
        while depth_stack and depth <= depth_stack[-1]:
            depth_stack.pop()
    return found


def async_waits(ttgir: str) -> list[int]:
    """num of every ttg.async_wait inside a loop: the copies still in flight at that wait."""
    return _in_loops(ttgir, "ttg.async_wait", "num")


# strides that multiply a batch / head / row index: widened to int64 before any arithmetic, so that
# B x S x D past 2**31 elements (e.g. B = 64, S = 32k, D = 256) does not wrap
WIDE_STRIDES = ("sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh", "svs", "sob", "soh", "sot",
                "sxm", "sqw", "sym", "sdym", "sdxm")


def int64_offsets(ttgir: str) -> dict:
    """For each WIDE_STRIDES kernel argument: True when every use of it in the TTGIR is a sign
    extension to i64 (or it is i64 already)."""
    out = {}
    head = next((line for line in ttgir.splitlines() if "tt.func public" in line), "")
    for name in WIDE_STRIDES:
        m = re.search(rf"%{name}: (\w+)", head)
        if not m:
            continue
        if m.group(1) == "i64":
            out[name] = True
            continue
        uses = [line for line in ttgir.splitlines() if re.search(rf"%{name}\b", line) and "tt.func" not in line]
        out[name] = bool(uses) and all(re.search(rf"arith\.extsi %{name} : i32 to i64", u) for u in uses)
    return out


def dot_kinds(ttgir: str) -> dict:
    """wgmma (ttng.warp_group_dot, with the pendings of its waits inside loops: 0 = each wgmma
    waited on at once) against mma.sync (tt.dot left as is), and the async copies."""
    return dict(wgmma=len(re.findall(r"ttng\.warp_group_dot\s", ttgir)), mma_sync=len(re.findall(r"= tt\.dot\s", ttgir)),
                wgmma_wait_pendings=_in_loops(ttgir, "warp_group_dot_wait", "pendings"),
                async_copies=len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)))


_PTX_LOAD = re.compile(r"^\s*(?:@%p\d+\s+)?(ld\.global[.\w]*|cp\.async\.c[ag]\.shared\.global[.\w]*)\s+(.*)$")


def ptx_loads_by_line(ptx: str, source: list, source_name: str, pattern: str) -> dict:
    """Global loads and cp.async that PTX's line table attributes to source lines matching
    `pattern` (a regex over the line's text), by width in bytes."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, flags=re.M))
    cur = None
    widths = Counter()
    rx = re.compile(pattern)
    for line in ptx.splitlines():
        m = re.match(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m:
            cur = (m.group(1), int(m.group(2)))
            continue
        m = _PTX_LOAD.match(line)
        if not m or cur is None:
            continue
        if Path(files.get(cur[0], "")).name != source_name:
            continue
        text = source[cur[1] - 1] if 0 < cur[1] <= len(source) else ""
        if not rx.search(text):
            continue
        op, rest = m.group(1), m.group(2)
        if op.startswith("cp.async"):
            mm = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]", rest)
            widths[int(mm.group(1), 0) if mm else 0] += 1
        else:
            vec = re.search(r"\.v(\d)", op)
            base = re.search(r"\.[bfsu](\d+)\b", op)
            widths[(int(vec.group(1)) if vec else 1) * (int(base.group(1)) // 8 if base else 4)] += 1
    total = sum(widths.values())
    return dict(by_width={str(k): v for k, v in sorted(widths.items())}, total=total,
                share_128bit=(widths.get(16, 0) / total) if total else None)



def analyse(build: Build, weight_pattern: str | None = None) -> dict:
    loops = sass_loops(build.sass)
    main = main_loop(loops)
    waits = async_waits(build.ttgir)
    all_ins = sass_instructions(build.sass)
    row = dict(kernel=build.kernel, label=build.label, consts=build.consts, num_warps=build.num_warps,
               num_stages=build.num_stages, registers=build.registers, spill_stack=build.spill_stack,
               local=build.local, shared=build.shared,
               local_mem_ops=sum(1 for _, op, _ in all_ins if op.startswith("LDL") or op.startswith("STL")),
               total_instructions=len(all_ins), loops=len(loops), main_loop=main,
               loop_sizes=[l["instructions"] for l in loops], loop_details=loops,
               async_waits_in_loops=waits, min_wait_in_flight=min(waits) if waits else None,
               dots=dot_kinds(build.ttgir), int64_strides=int64_offsets(build.ttgir))
    if weight_pattern:
        row["weight_loads"] = ptx_loads_by_line(build.ptx, build.source, build.source_name, weight_pattern)
    return row


# ---------------------------------------------------------------------------------------- configs
# Every configuration the launchers pick on CUDA (their own plan functions) for the shapes of
# benchmarks/kernels.py, plus the other dtypes / zero-point variants of the same plans.

TDT = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
INT4_SIZES = (4096, 8192)
INT4_MS = (1, 16, 1024, 4096)
GROUPS = (32, 128)
PREFILL_TS = (1024, 2048, 4096, 8192, 16384)
DECODE_GRID = [(b, s) for s in (1024, 4096, 16384, 32768) for b in (1, 4, 16, 64)]
# Gemma-2-2B attention, as in benchmarks/kernels.py
HQ, HKV, HEAD_DIM, SOFTCAP, WINDOW = 8, 4, 256, 50.0, 4096


@dataclasses.dataclass
class Config:
    key: tuple
    fn: tuple  # (module, name): JIT functions do not pickle into the compile processes
    types: dict
    consts: dict
    units: tuple
    num_warps: int
    num_stages: int
    label: str
    weight_pattern: str | None = None


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def int4_config(m, n, k, dt, group, zeros, backward=False) -> tuple[Config, object]:
    from edgeslm.kernels import int4_matmul as im

    dtype = _torch_dtype(dt)
    if backward:
        p = im.plan_dx(m, n, k, dtype)
        types = dict(DY="*" + dt, DX="*" + dt, QW="*i32", SC="*fp16", ZP="*u8")
        consts = dict(GROUP=group, HAS_ZEROS=zeros, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k,
                      DOT_MODE=im._dot_mode(dtype), NUM_STAGES=p.num_stages)
        fn, units = im._int4_mm_dx_kernel, ("sdyn", "sdxk")
    else:
        p = im.plan_forward(m, n, k, dtype)
        types = dict(X="*" + dt, QW="*i32", SC="*fp16", ZP="*u8", Y="*" + dt, PART="*fp32", TICKET="*i32")
        consts = dict(GROUP=group, HAS_ZEROS=zeros, SPLIT_K=p.split_k, BLOCK_N=p.block_n, BLOCK_K=p.block_k,
                      NUM_STAGES=p.num_stages)
        if p.kernel == "gemv":
            fn = im._int4_gemv_kernel
            consts["EXACT"] = dt == "fp32"
        else:
            fn = im._int4_mm_kernel
            consts.update(BLOCK_M=p.block_m, DOT_MODE=im._dot_mode(dtype))
        units = ("sxk", "syn")
        # split-K only changes the epilogue: one build for every split count > 1
        consts["SPLIT_K"] = 2 if p.split_k > 1 else 1
    label = f"{fn.__name__.strip('_')} {dt} g{group}{' zp' if zeros else ''} " + (
        f"BM{p.block_m} " if p.kernel != "gemv" else "") + f"BN{p.block_n} BK{p.block_k} w{p.num_warps} s{p.num_stages}"
    key = (fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())), p.num_warps, p.num_stages)
    return Config(key, (fn.__module__, fn.__name__), types, consts, units, p.num_warps, p.num_stages, label, r"tl\.load\((QW|w_row)"), p


def attention_config(dt, head_dim, *, decode, b=1, s=4096, t=1, softcap=True, window=True) -> tuple[Config, dict]:
    import triton

    from edgeslm.kernels import softcap_attention as sa

    dtype = _torch_dtype(dt)
    bm, bn, nw, ns = sa.gpu_config(head_dim, dtype, decode)
    group = HQ // HKV
    types = dict(Q="*" + dt, K="*" + dt, V="*" + dt, OUT="*" + dt, QPOS="*i64", KPOS="*i64", STATS="*i32", RANGES="*i32",
                 PART="*fp32", LSE="*fp32", TICKET="*i32", c_scale="fp32", c_cap="fp32")
    consts = dict(HQ=HQ, HKV=HKV, GROUP=group, HEAD_DIM=head_dim, D=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                  HAS_SOFTCAP=softcap, HAS_WINDOW=window, COUNT_BLOCKS=False, DOT_MODE=sa.dot_mode(dtype), NUM_STAGES=ns)
    plan = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
    if decode:
        rows = t * group
        bm = max(16, sa._next_pow2(rows))
        n_blocks = triton.cdiv(s, bn)
        dec = sa.decode_constants(b, HKV, rows, n_blocks, bn, head_dim, Machine("x").sms)
        consts.update(BLOCK_M=bm, **dec)
        plan.update(block_m=bm, splits=dec["NUM_SPLITS"], n_blocks=n_blocks,
                    per_split=triton.cdiv(n_blocks, dec["NUM_SPLITS"]))
        splits = dec["NUM_SPLITS"]
        fn = sa._attn_decode_kernel
        label = f"attn_decode {dt} hd{head_dim} BN{bn} w{nw} s{ns} splits{splits}"
    else:
        fn = sa._attn_prefill_kernel
        label = f"attn_prefill {dt} hd{head_dim} BM{bm} BN{bn} w{nw} s{ns}" + ("" if softcap else " no-softcap") + (
            "" if window else " no-window")
    key = (fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())), nw, ns)
    return Config(key, (fn.__module__, fn.__name__), types, consts, ("sqd", "skd", "svd", "sod"), nw, ns, label), plan


def all_configs(quick: bool):
    """-> (configs to compile, benchmark shapes [(kind, shape dict, config key, plan)])."""
    dts = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    configs, shapes = {}, []

    def add(cfg):
        configs.setdefault(cfg.key, cfg)
        return cfg.key

    # int4: the benchmark shapes (bf16), every group / zero-point variant
    for dt in dts:
        for group in GROUPS:
            for zeros in (False, True):
                if quick and (group, zeros) not in ((32, False), (128, True)):
                    continue
                for kn in INT4_SIZES:
                    for m in INT4_MS:
                        if quick and (kn != 4096 or m not in (1, 1024)):
                            continue
                        cfg, p = int4_config(m, kn, kn, dt, group, zeros)
                        key = add(cfg)
                        if dt == "bf16":
                            shapes.append(("int4", dict(m=m, n=kn, k=kn, group=group, zeros=zeros), key, p))
                if not quick:
                    for m in (16, 1024):  # the QLoRA backward
                        add(int4_config(m, 4096, 4096, dt, group, zeros, backward=True)[0])
    # attention at the Gemma-2-2B shape; other head dims compile too
    for dt in dts:
        for hd in ((256,) if quick else (64, 128, 256)):
            cfg, plan = attention_config(dt, hd, decode=False)
            key = add(cfg)
            if dt == "bf16" and hd == HEAD_DIM:
                for t in PREFILL_TS:
                    if quick and t != 8192:
                        continue
                    shapes.append(("prefill", dict(t=t, softcap=SOFTCAP, window=WINDOW), key, plan))
                if not quick:
                    cfg2, plan2 = attention_config(dt, hd, decode=False, softcap=False, window=False)
                    key2 = add(cfg2)
                    for t in PREFILL_TS:
                        shapes.append(("prefill", dict(t=t, softcap=None, window=None), key2, plan2))
            for b, s in DECODE_GRID:
                if (quick or dt != "bf16" or hd != HEAD_DIM) and (b, s) != (1, 32768):
                    continue
                cfg, plan = attention_config(dt, hd, decode=True, b=b, s=s, window=False)
                key = add(cfg)
                if dt == "bf16" and hd == HEAD_DIM:
                    shapes.append(("decode", dict(b=b, s=s), key, plan))
            if dt == "bf16" and hd == HEAD_DIM and not quick:  # a local layer's ring at a long position
                cfg, plan = attention_config(dt, hd, decode=True, b=16, s=WINDOW, window=True)
                shapes.append(("decode", dict(b=16, s=WINDOW, ring=True), add(cfg), plan))
    return list(configs.values()), shapes


def _compile_and_analyse(cfg: Config) -> dict:
    import importlib

    sys.path.insert(0, str(ROOT))
    fn = getattr(importlib.import_module(cfg.fn[0]), cfg.fn[1])
    b = compile_config(fn, cfg.types, cfg.consts, cfg.units, cfg.num_warps, cfg.num_stages, cfg.label)
    row = analyse(b, cfg.weight_pattern)
    row["key"] = repr(cfg.key)
    return row


def audit_builds(configs, jobs: int) -> dict:
    """key -> analysis row, compiled in `jobs` processes."""
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_compile_and_analyse, configs))
    else:
        rows = [_compile_and_analyse(c) for c in configs]
    return {c.key: r for c, r in zip(configs, rows)}


# ---------------------------------------------------------------------------------------- estimates


def _occupancy(row, machine: Machine) -> int:
    threads = 32 * row["num_warps"]
    by_regs = machine.regs_per_sm // max(1, threads * max(row["registers"], 32))
    by_smem = machine.smem_per_sm // max(1, row["shared"]) if row["shared"] else 32
    return max(1, min(by_regs, by_smem, 2048 // threads))


def _per_sm_programs(programs: int, machine: Machine) -> int:
    return math.ceil(programs / machine.sms)


def _overhead_cycles(row) -> int:
    """Instructions per warp outside every loop: run once per program (prologue, epilogue)."""
    return max(0, row["total_instructions"] - sum(row["loop_sizes"]))


def estimate_memory_bound(row, machine: Machine, *, bytes_moved: float, programs: int, iters_per_program: float,
                          loop: dict, stage_bytes: float, extra_latencies: int = 0, launches: int = 1) -> dict:
    """t = launches x launch + (1 + extra) x latency + max(memory, issue), where memory runs at the
    lesser of HBM and what the copies in flight sustain (Little's law), and issue is one warp
    instruction per clock per sub-partition over the programs each SM runs."""
    f = machine.clock_ghz * 1e9
    occ = _occupancy(row, machine)
    resident = min(occ, _per_sm_programs(programs, machine))
    in_flight = resident * max(1, row["num_stages"] - 1) * stage_bytes
    bw = min(machine.hbm_tbs * 1e12, machine.sms * in_flight / (machine.latency_ns * 1e-9))
    t_mem = bytes_moved / bw
    per_prog = row["num_warps"] * (iters_per_program * loop["instructions"] + _overhead_cycles(row))
    t_issue = _per_sm_programs(programs, machine) * per_prog / ISSUE_PER_CLK_SM / f
    t = launches * machine.launch_us * 1e-6 + (1 + extra_latencies) * machine.latency_ns * 1e-9 + max(t_mem, t_issue)
    ideal = bytes_moved / (machine.hbm_tbs * 1e12)
    return dict(us=t * 1e6, hbm_fraction=ideal / t, steady_hbm_fraction=ideal / max(t_mem, t_issue),
                bound="issue" if t_issue > t_mem else ("latency" if bw < machine.hbm_tbs * 1e12 else "memory"),
                issue_us=t_issue * 1e6, memory_us=t_mem * 1e6, programs=programs, resident_per_sm=resident)


def estimate_int4(shape, plan, row, machine: Machine) -> dict:
    m, n, k, group, zeros = shape["m"], shape["n"], shape["k"], shape["group"], shape["zeros"]
    loop = row["main_loop"]
    w_bytes = n * k / 2 + n * (k // group) * (2 + (1 if zeros else 0))
    programs = plan.grid[0] * plan.grid[1]
    iters = plan.words_per_split * 8 / plan.block_k
    if m <= 16:
        est = estimate_memory_bound(row, machine, bytes_moved=w_bytes + 2 * m * (n + k), programs=programs,
                                    iters_per_program=iters, loop=loop, stage_bytes=plan.block_n * plan.block_k / 2,
                                    extra_latencies=1 if plan.split_k > 1 else 0)
        est["metric"] = f"{est['hbm_fraction']:.0%} of HBM"
        est["goal"] = dict(what="GEMV >= 70% of HBM (M = 1)", met=est["hbm_fraction"] >= 0.7) if m == 1 else None
        return est
    f = machine.clock_ghz * 1e9
    tensor = 2 * plan.block_m * plan.block_n * plan.block_k / TENSOR_FLOP_PER_CLK_SM
    issue = loop["instructions"] * row["num_warps"] / ISSUE_PER_CLK_SM
    per_iter = max(tensor, issue)
    occ = _occupancy(row, machine)
    waves = math.ceil(programs / (machine.sms * occ))
    cycles = waves * occ * (iters * per_iter + _overhead_cycles(row) * row["num_warps"] / ISSUE_PER_CLK_SM)
    t = machine.launch_us * 1e-6 + machine.latency_ns * 1e-9 + cycles / f
    frac = 2 * m * n * k / t / (machine.bf16_tflops * 1e12)
    return dict(us=t * 1e6, peak_fraction=frac, bound="tensor" if tensor >= issue else "issue", programs=programs,
                waves=waves, metric=f"{frac:.0%} of dense bf16 peak", goal=None)


def kept_pairs(t: int, window) -> int:
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def _loops_by_role(row):
    """(masked loop, unmasked loop) of the prefill kernel: the MMA loops, largest and smallest."""
    mma = [l for l in row["loop_details"] if l["hgmma"] + l["hmma"] > 0]
    mma.sort(key=lambda l: l["instructions"])
    return mma[-1], mma[0]


def estimate_prefill(shape, plan, row, machine: Machine) -> dict:
    """Per KV block and SM (one program per SM at these tiles): tensor cycles T (both GEMMs), issue
    cycles I (the loop's instructions x warps / 4) and MUFU cycles. wgmma waited at once
    (pendings 0) serializes each warpgroup's MMAs with its softmax; two warpgroups overlap somewhere
    between lockstep (T + I) and perfect alternation (max(T, I)): the midpoint is taken. Programs are
    list-scheduled onto the SMs in launch order; each of a program's three block ranges pays one
    memory latency to fill its pipeline. Only the FLOPs the mask keeps count."""
    import torch

    from edgeslm.kernels.softcap_attention import live_kv_ranges

    t, window = shape["t"], shape["window"]
    window = int(window) if window else None
    bm, bn, nw = plan["block_m"], plan["block_n"], plan["num_warps"]
    group = HQ // HKV
    rows = t * group
    n_m = -(-rows // bm)
    pos = torch.arange(t)
    ranges = live_kv_ranges(pos, pos, group, bm, bn, n_m, window).tolist()
    masked, full = _loops_by_role(row)
    tensor = 2 * 2 * bm * bn * HEAD_DIM / TENSOR_FLOP_PER_CLK_SM
    f = machine.clock_ghz * 1e9
    lat = machine.latency_ns * 1e-9 * f
    waited = 0 in row["dots"]["wgmma_wait_pendings"]

    def per_block(loop):
        issue = loop["instructions"] * nw / ISSUE_PER_CLK_SM
        mufu = loop["mufu"] * nw * 32 / MUFU_LANES_PER_CLK_SM
        best = max(tensor, issue, mufu)
        return (best + max(tensor + issue, mufu)) / 2 if waited else best

    c_masked, c_full = per_block(masked), per_block(full)
    overhead = _overhead_cycles(row) * nw / ISSUE_PER_CLK_SM
    progs = []
    for lo, f_lo, f_hi, hi in reversed(ranges):  # launch order: heaviest query blocks first
        n_ranges = sum(1 for a, b in ((lo, f_lo), (f_lo, f_hi), (f_hi, hi)) if b > a)
        cyc = (f_lo - lo + hi - f_hi) * c_masked + (f_hi - f_lo) * c_full + overhead + n_ranges * lat
        progs += [cyc] * HKV  # batch 1
    import heapq

    sms = [0.0] * (machine.sms * _occupancy(row, machine))
    heapq.heapify(sms)
    for c in progs:
        heapq.heappush(sms, heapq.heappop(sms) + c)
    occ = _occupancy(row, machine)
    makespan = max(sms) * occ  # co-resident programs share the SM's units
    t_s = machine.launch_us * 1e-6 + makespan / f
    flops = 4 * HEAD_DIM * HQ * kept_pairs(t, window)
    frac = flops / t_s / (machine.bf16_tflops * 1e12)
    full_blocks = sum(b - a for _, a, b, _ in ranges)
    all_blocks = sum(h - lo for lo, _, _, h in ranges)
    return dict(us=t_s * 1e6, peak_fraction=frac, metric=f"{frac:.0%} of dense bf16 peak (kept FLOPs)",
                cycles_per_block_full=c_full, cycles_per_block_masked=c_masked, tensor_cycles_per_block=tensor,
                whole_block_share=full_blocks / max(1, all_blocks), programs=len(progs),
                goal=dict(what="prefill >= 50% of dense bf16 peak", met=frac >= 0.5)
                if shape["softcap"] and t == 8192 else None)


def estimate_decode(shape, plan, row, machine: Machine) -> dict:
    b, s = shape["b"], shape["s"]
    bn = plan["block_n"]
    kv_bytes = 2 * b * HKV * s * HEAD_DIM * 2
    splits, per_split = plan["splits"], plan["per_split"]
    loop = row["main_loop"]
    merge_loads = 1 + math.ceil(splits / row["consts"].get("MERGE_CHUNK", 1)) if splits > 1 else 0
    est = estimate_memory_bound(row, machine, bytes_moved=kv_bytes, programs=b * HKV * splits,
                                iters_per_program=per_split, loop=loop, stage_bytes=2 * bn * HEAD_DIM * 2,
                                extra_latencies=1 + merge_loads)  # the position scan, the merge
    est["metric"] = f"{est['hbm_fraction']:.0%} of HBM"
    est["goal"] = dict(what="decode >= 80% of HBM (B = 1, S = 32k)", met=est["hbm_fraction"] >= 0.8) \
        if (b, s) == (1, 32768) and not shape.get("ring") else None
    return est


def estimates(shapes, rows) -> list[dict]:
    out = []
    for kind, shape, key, plan in shapes:
        row = rows[key]
        for machine in MACHINES:
            fn = dict(int4=estimate_int4, prefill=estimate_prefill, decode=estimate_decode)[kind]
            est = fn(shape, plan, row, machine)
            out.append(dict(kind=kind, shape=shape, machine=machine.name, config=row["label"], **est))
    return out


# ---------------------------------------------------------------------------------------- report


def structural_checks(rows) -> list[dict]:
    """The properties the CI test asserts, per build."""
    checks = []
    for r in rows:
        ml = r["main_loop"] or {}
        name = r["label"]
        checks.append(dict(build=name, check="no spills", ok=r["spill_stack"] == 0 and r["local_mem_ops"] == 0))
        narrow = [k for k, v in r["int64_strides"].items() if not v]
        checks.append(dict(build=name, check="int64 offsets" + (f" (int32: {', '.join(narrow)})" if narrow else ""),
                           ok=not narrow))
        if r["kernel"].startswith("_int4"):
            checks.append(dict(build=name, check="no I2F in the main loop", ok=ml.get("i2f", 1) == 0))
            wl = r.get("weight_loads") or {}
            checks.append(dict(build=name, check=">= 80% of weight loads 128-bit",
                               ok=(wl.get("share_128bit") or 0) >= 0.8))
            checks.append(dict(build=name, check="weight loads pipelined (cp.async, >= 1 in flight)",
                               ok=ml.get("ldgsts", 0) > 0 and (r["min_wait_in_flight"] or 0) >= 1))
        if r["kernel"] == "_attn_prefill_kernel":
            checks.append(dict(build=name, check="prefill loop keeps >= 2 copies in flight",
                               ok=(r["min_wait_in_flight"] or 0) >= 2))
        if r["kernel"] == "_attn_decode_kernel":
            checks.append(dict(build=name, check="decode loop pipelined (cp.async, >= 1 in flight)",
                               ok=ml.get("ldgsts", 0) > 0 and (r["min_wait_in_flight"] or 0) >= 1))
    return checks


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks/kernel_audit.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (+ uncommitted kernel changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_table(rows) -> str:
    head = ("build", "regs", "spill", "smem KiB", "loop instr/warp", "MUFU", "I2F", "HGMMA", "HMMA", "LDG/LDGSTS",
            "128-bit loads", "weight 128-bit", "async wait", "wgmma pendings")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ml = r["main_loop"] or {}
        wl = r.get("weight_loads")
        pend = sorted(set(r["dots"]["wgmma_wait_pendings"]))
        lines.append("| " + " | ".join(str(x) for x in (
            r["label"], r["registers"], r["spill_stack"], f"{r['shared'] / 1024:.0f}",
            "/".join(str(x) for x in r["loop_sizes"]) or "-", ml.get("mufu", "-"), ml.get("i2f", "-"),
            ml.get("hgmma", "-"), ml.get("hmma", "-"), f"{ml.get('ldg', 0)}/{ml.get('ldgsts', 0)}",
            "-" if ml.get("share_128bit") is None else f"{ml['share_128bit']:.0%}",
            "-" if not wl or wl["share_128bit"] is None else f"{wl['share_128bit']:.0%}",
            ",".join(str(x) for x in sorted(set(r["async_waits_in_loops"]))) or "-", ",".join(map(str, pend)) or "-")) + " |")
    return "\n".join(lines)


def _shape_name(kind, shape) -> str:
    if kind == "int4":
        return f"M={shape['m']} K=N={shape['n']} G={shape['group']}" + (" zp" if shape["zeros"] else "")
    if kind == "prefill":
        return f"T={shape['t']} " + (f"softcap {shape['softcap']:g} window {shape['window']}" if shape["softcap"] else "causal")
    return f"B={shape['b']} S={shape['s']}" + (" ring" if shape.get("ring") else "")


def estimate_table(ests) -> str:
    by = {}
    for e in ests:
        by.setdefault((e["kind"], json.dumps(e["shape"], sort_keys=True)), {})[e["machine"]] = e
    head = ("ESTIMATE", "shape", "H100 us", "H100", "H200 us", "H200", "bound (H200)", "goal", "met (H100 / H200)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kind, shape_js), per in by.items():
        shape = json.loads(shape_js)
        h100, h200 = per["H100"], per["H200"]
        goal = h200.get("goal")
        met = "" if not goal else f"{'yes' if h100['goal']['met'] else 'NO'} / {'yes' if goal['met'] else 'NO'}"
        lines.append("| " + " | ".join((
            kind, _shape_name(kind, shape), f"{h100['us']:.1f}", h100["metric"], f"{h200['us']:.1f}", h200["metric"],
            h200.get("bound", "-"), goal["what"] if goal else "", met)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Static sm_90 audit of edgeslm's Triton kernels (no GPU needed).",
                                epilog="Example: python benchmarks/kernel_audit.py --json > audit.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--quick", action="store_true", help="a representative subset (bf16; what the CI test compiles)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compile processes (default: %(default)s)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_audit: unset TRITON_INTERPRET (the audit compiles for sm_90)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    configs, shapes = all_configs(args.quick)
    rows = audit_builds(configs, args.jobs)
    ests = estimates(shapes, rows)
    builds = list(rows.values())
    checks = structural_checks(builds)
    import triton

    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=_git_commit(),
        machine=f"{platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} CPUs, no GPU needed)",
        triton=triton.__version__, target="sm_90a (cuda 90, ptxas / cuobjdump bundled with Triton)",
        machines=[dataclasses.asdict(m) for m in MACHINES], quick=args.quick, builds=builds, estimates=ests,
        checks=checks, all_checks_ok=all(c["ok"] for c in checks),
        goals_met={f"{e['kind']} {_shape_name(e['kind'], e['shape'])} {e['machine']}": e["goal"]["met"]
                   for e in ests if e.get("goal")},
        wall_s=round(time.perf_counter() - t0, 1))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(f"{result['date']}; commit {result['commit']}; triton {result['triton']}; {result['target']}; "
              f"{len(builds)} builds in {result['wall_s']} s\n")
        print(build_table(builds) + "\n")
        print(estimate_table(ests) + "\n")
        bad = [c for c in checks if not c["ok"]]
        print("structural checks: " + ("all pass" if not bad else "FAILED: " + "; ".join(f"{c['build']}: {c['check']}" for c in bad)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
