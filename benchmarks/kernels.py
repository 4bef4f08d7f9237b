"""GPU benchmark of the Triton performance core (kernels/), in one run of under 6 minutes.

  python benchmarks/kernels.py --record        # on a CUDA machine; appends to benchmarks/RESULTS.md

Order: the card's measured ceilings (device-to-device copy GB/s, bf16 matmul TFLOP/s); a parity
check of the decoder with the kernels against the decoder with the references; prefill attention
at the Gemma-2-2B shape (8 q / 4 kv heads, head_dim 256, soft-cap 50, window 4096) against
torch.compile'd FlexAttention with the same score_mod and block mask, and against SDPA where SDPA
computes the same function (no soft-cap, no window); decode attention (batch 1..64, kv 1k..32k);
int4 GEMV / GEMM (K = N = 4096 / 8192, groups 32 / 128) against bf16 torch.matmul.

Methodology:
- times are medians (CUDA graphs of many calls, triton.testing.do_bench_cudagraph) over rotating input
  sets, enough sets that one pass reads more than twice the L2 (so weights and KV come from HBM, as in a
  real decode); every figure is given against both the card's measured ceilings (D2D copy, bf16
  matmul) and its datasheet figures;
- prefill is compared with FlexAttention compiled with mode="max-autotune-no-cudagraphs" (the config
  it picks is logged by inductor; the mode is recorded), two ways: bookkeeping out (flex's block mask
  and our live-range table made once, outside the timing) and bookkeeping in (both made inside every
  timed call);
- decode has a peer too: compiled FlexAttention on one query row (its flex-decoding path);
- int4 covers the zero-point path as well, and the GEMV goals are checked at M = 1;
- every benchmarked shape is first checked against the torch reference (prefill on a slice of query
  rows), and a mismatch is reported as a failed row;
- TFLOP/s count only the work the mask keeps.
One table goes to stdout, the figures to --out as JSON. Once --budget-s has passed, the remaining
measurements are skipped and listed as skipped (never silently dropped).

--smoke runs tiny shapes on the CPU under TRITON_INTERPRET=1 to check the script itself; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GOALS = {
    "prefill_vs_flex": 1.2,  # x compiled FlexAttention with the same mods
    "prefill_frac_peak": 0.5,  # of measured bf16 matmul TFLOP/s
    "decode_frac_copy": 0.8,  # of measured copy GB/s
    "gemv_vs_bf16": 3.2,
    "gemv_frac_copy": 0.7,
    "gemm_vs_bf16": 0.9,  # at M >= 1024
}

# datasheet (copy GB/s as HBM bandwidth, dense bf16 TFLOP/s), matched against the device name
DATASHEET = (("H200", 4800.0, 989.4), ("H100 PCIe", 2000.0, 756.0), ("H100", 3350.0, 989.4),
             ("A100-SXM4-80GB", 2039.0, 312.0), ("A100", 1555.0, 312.0), ("L40S", 864.0, 362.0))

# Gemma-2-2B attention
HQ, HKV, HEAD_DIM, SOFTCAP, WINDOW, SCALE = 8, 4, 256, 50.0, 4096, 256 ** -0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark edgeslm's Triton kernels on a CUDA GPU (ceilings, attention, int4 matmul).",
        epilog="Example: python benchmarks/kernels.py --record   (needs a CUDA GPU; about 5 minutes)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels.json"),
                   help="where to write the JSON figures (default: %(default)s)")
    p.add_argument("--record", action="store_true", help="append a section with the table to benchmarks/RESULTS.md")
    p.add_argument("--budget-s", type=float, default=320.0,
                   help="start no new measurement after this many seconds (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=["parity", "prefill", "decode", "int4"],
                   help="run only these parts (the ceilings always run)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="time eagerly with do_bench (includes Python launch overhead) instead of in CUDA graphs")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, figures are meaningless")
    return p.parse_args(argv)


class Runner:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.t0 = time.perf_counter()
        self.rows, self.skipped, self.notes = [], [], []
        self.ceil = {}
        self.datasheet = {}
        self.timer = "wall"  # how the last bench_ms timed (cudagraph / eager / wall)
        if device == "cuda":
            import torch

            self.l2 = torch.cuda.get_device_properties(0).L2_cache_size
        else:
            self.l2 = 1 << 20

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.t0 > self.args.budget_s:
            self.skipped.append(what)
            return True
        return False

    def sets_for(self, nbytes: int, cap: int = 64) -> int:
        """Input sets to rotate through so that one pass reads more than twice the L2."""
        return max(1, min(cap, math.ceil(2 * self.l2 / max(nbytes, 1))))

    def bench_ms(self, fns) -> float:
        """Median ms of one call, rotating through the list of zero-argument callables."""
        import torch

        state = {"i": 0}

        def step():
            fns[state["i"] % len(fns)]()
            state["i"] += 1

        if self.device == "cuda":
            from triton.testing import do_bench, do_bench_cudagraph

            step()  # compile / autotune outside any timing or capture
            torch.cuda.synchronize()
            if self.args.graphs:
                # A CUDA graph of many calls removes the Python launch overhead, which would
                # otherwise dominate microsecond decode kernels; the kernels are what is measured.
                try:
                    self.timer = "cudagraph"
                    return float(do_bench_cudagraph(step, rep=100, return_mode="median"))
                except Exception as e:  # a call that cannot be captured: time it eagerly instead
                    torch.cuda.synchronize()
                    self.notes.append(f"cuda graph capture failed ({type(e).__name__}: {str(e)[:80]}); timed eagerly")
            self.timer = "eager"
            return float(do_bench(step, warmup=25, rep=100, return_mode="median"))
        step()  # smoke mode: a few wall-clock runs
        times = []
        for _ in range(3):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        torch.zeros(1)
        return sorted(times)[1]

    def peer_ms(self, label: str, fns):
        """bench_ms for a peer; a peer that fails (e.g. out of shared memory at head_dim 256) is
        recorded in the notes and its ratio left empty, instead of ending the run."""
        try:
            return self.bench_ms(fns)
        except Exception as e:  # noqa: BLE001 - any peer failure is reported, not fatal
            if self.device == "cuda":
                import torch

                torch.cuda.synchronize()
            self.notes.append(f"peer {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            print("  " + self.notes[-1], file=sys.stderr, flush=True)
            return None

    def add(self, part, shape, ms, *, tflops=None, gbps=None, peer=None, peer_ms=None, ratio_goal=None,
            frac=None, frac_goal=None, max_err=None, correct=None):
        ratio = (peer_ms / ms) if peer_ms else None
        sheet = None
        if self.datasheet and gbps is not None and tflops is None:
            sheet = gbps / self.datasheet["copy_gbps"]
        elif self.datasheet and tflops is not None:
            sheet = tflops / self.datasheet["bf16_tflops"]
        met = None
        if ratio_goal is not None and ratio is not None:
            met = ratio >= ratio_goal
        if frac_goal is not None and frac is not None:
            met = (met is not False) and frac >= frac_goal
        if correct is False:
            met = False
        row = dict(part=part, shape=shape, ms=ms, tflops=tflops, gbps=gbps, peer=peer, peer_ms=peer_ms,
                   ratio=ratio, ratio_goal=ratio_goal, frac_ceiling=frac, frac_datasheet=sheet, frac_goal=frac_goal,
                   goal_met=met, max_err=max_err, correct=correct, timer=self.timer)
        self.rows.append(row)
        print(f"  {part:<14} {shape:<36} {ms:9.4f} ms", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- ceilings


def measure_ceilings(r: Runner):
    import torch

    n_copy = (1 << 28) if r.device == "cuda" else (1 << 20)  # 512 MiB of bf16
    src = torch.empty(n_copy, dtype=torch.bfloat16, device=r.device).normal_()
    dst = torch.empty_like(src)
    ms_copy = r.bench_ms([lambda: dst.copy_(src)])
    r.ceil["copy_gbps"] = 2 * src.numel() * 2 / ms_copy / 1e6  # read + write
    r.add("ceiling", f"D2D copy {n_copy * 2 >> 20} MiB", ms_copy, gbps=r.ceil["copy_gbps"])
    del src, dst
    if r.device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, gbps, tflops in DATASHEET:
            if key in name:
                r.datasheet = dict(card=key, copy_gbps=gbps, bf16_tflops=tflops)
                break
    n = 8192 if r.device == "cuda" else 128
    a = torch.randn(n, n, dtype=torch.bfloat16, device=r.device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=r.device)
    ms_mm = r.bench_ms([lambda: torch.matmul(a, b)])
    r.ceil["bf16_tflops"] = 2 * n ** 3 / ms_mm / 1e9
    r.add("ceiling", f"bf16 matmul {n}^3", ms_mm, tflops=r.ceil["bf16_tflops"])


# ---------------------------------------------------------------------------------------- parity


def parity_check(r: Runner):
    """Random Gemma 2 with the 2B attention shape: kernels vs references, float and int4."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from edgeslm import ops
    from edgeslm.loading import build_decoder
    from edgeslm.quantizer import quantize_model
    from edgeslm.schemes import get_scheme

    small = r.device != "cuda"
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=32 if small else HEAD_DIM,
                       sliding_window=16 if small else 128, attn_logit_softcapping=SOFTCAP,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=256, max_position_embeddings=4096,
                       initializer_range=0.1)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    model_cpu = build_decoder(hf.config, hf.state_dict()).float().eval()
    chunks, steps = ((20, 13), 6) if small else ((300, 211), 40)  # past the window, ring wraps
    prompt = torch.randint(0, 512, (2, sum(chunks)), device=r.device)

    @torch.no_grad()
    def run(m):
        cache = m.new_cache(2, sum(chunks) + steps, device=r.device)
        out, start = [], 0
        for size in chunks:
            logits, cache = m(prompt[:, start:start + size], start, cache)
            out.append(logits.float())
            start += size
        for _ in range(steps):
            logits, cache = m(logits[:, -1:].argmax(-1), start, cache)
            out.append(logits.float())
            start += 1
        return out

    def kernels(m):
        if r.device == "cuda":
            return run(m)
        with ops.kernels_on_cpu():
            return run(m)

    def err(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    results = {}
    for name in ("float", "q4g32"):
        model = copy.deepcopy(model_cpu)
        if name == "q4g32":  # on the CPU: the int4 modules are created there, then moved
            quantize_model(model, get_scheme("q4g32-rtn"), progress=False)
        model = model.to(r.device)
        with ops.reference_only():
            exact = run(model)
        fp32_err = err(kernels(model), exact)
        ok = fp32_err <= 1e-3 * max(1.0, max(x.abs().max().item() for x in exact))
        line = f"parity {name}: fp32 kernels vs reference max |dlogit| {fp32_err:.2e}"
        results[name] = dict(fp32_max_err=fp32_err)
        if name == "float":  # (an int4 model cannot run in bf16 yet: Int4Embedding returns fp32 rows)
            m16 = copy.deepcopy(model).to(torch.bfloat16)
            with ops.reference_only():
                ref16_err = err(run(m16), exact)
            ker16_err = err(kernels(m16), exact)
            ok = ok and ker16_err <= 1.5 * ref16_err + 1e-3
            results[name].update(bf16_kernel_err=ker16_err, bf16_reference_err=ref16_err)
            line += f"; bf16 kernels {ker16_err:.3g} vs bf16 reference {ref16_err:.3g} (both against fp32 reference)"
        results[name]["ok"] = ok
        r.notes.append(f"{line}: {'ok' if ok else 'FAILED'}")
        print("  " + r.notes[-1], file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------------------- attention


def kept_pairs(t: int, window: int | None) -> int:
    """(query, key) pairs a causal (+window) mask keeps at prefill from position 0."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def check(got, want, tol, rel=False) -> tuple[float, bool]:
    """Max |got - want| (relative to max |want| when rel) and whether it is within tol."""
    err = (got.float() - want.float()).abs().max().item()
    if rel:
        err /= max(want.float().abs().max().item(), 1e-30)
    return err, bool(err <= tol) and not bool(got.isnan().any())


FLEX_MODE = "max-autotune-no-cudagraphs"


def bench_prefill(r: Runner, lengths=None):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from edgeslm.kernels.softcap_attention import attention, attention_reference, prefill_ranges

    dt = torch.bfloat16
    lengths = lengths or ([1024, 4096, 16384] if r.device == "cuda" else [64])
    head_dim = HEAD_DIM if r.device == "cuda" else 32
    window = WINDOW if r.device == "cuda" else 24
    if r.device == "cuda":
        flex = torch.compile(flex_attention, dynamic=False, mode=FLEX_MODE)
        make_mask = torch.compile(create_block_mask)
        if f"flex mode {FLEX_MODE}" not in r.notes:
            r.notes.append(f"flex mode {FLEX_MODE}")
    else:
        flex, make_mask = flex_attention, create_block_mask

    def softcap_mod(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    for t in lengths:
        if r.over_budget(f"prefill T={t}"):
            continue
        nbytes = (HQ + 2 * HKV) * t * head_dim * 2
        sets = [(torch.randn(1, HQ, t, head_dim, device=r.device, dtype=dt),
                 torch.randn(1, HKV, t, head_dim, device=r.device, dtype=dt),
                 torch.randn(1, HKV, t, head_dim, device=r.device, dtype=dt)) for _ in range(r.sets_for(nbytes, 16))]
        pos = torch.arange(t, device=r.device)
        kw = dict(scale=SCALE, softcap=SOFTCAP, window=window)
        # correctness at this shape, on the first and last query rows (the reference is T x T)
        q0, k0, v0 = sets[0]
        got = attention(q0, k0, v0, pos, pos, **kw)
        rows = torch.cat((pos[:64], pos[-64:]))
        want = attention_reference(q0[:, :, rows], k0, v0, rows, pos, **kw)
        err, ok = check(got[:, :, rows], want, 3e-2)
        # bookkeeping out: flex's block mask and our range table made once, outside the timing
        mask = make_mask(window_mask, None, None, t, t, device=r.device)
        ranges = prefill_ranges(q0, k0, pos, pos, window)
        ours = r.bench_ms([lambda s=s: attention(*s, pos, pos, **kw, kv_ranges=ranges) for s in sets])
        peer = r.peer_ms(f"flex T={t}", [lambda s=s: flex(*s, score_mod=softcap_mod, block_mask=mask, scale=SCALE,
                                                            enable_gqa=True) for s in sets])
        flops = 4 * head_dim * HQ * kept_pairs(t, window)
        tf = flops / ours / 1e9
        peer_name = "flex (compiled)" if r.device == "cuda" else "flex (eager)"
        r.add("prefill", f"T={t} softcap {SOFTCAP:g} window {window}", ours, tflops=tf, peer=peer_name,
              peer_ms=peer, ratio_goal=GOALS["prefill_vs_flex"], frac=tf / r.ceil["bf16_tflops"],
              frac_goal=GOALS["prefill_frac_peak"], max_err=err, correct=ok)
        # bookkeeping in: both made inside every timed call
        ours_in = r.bench_ms([lambda s=s: attention(*s, pos, pos, **kw) for s in sets])
        peer_in = r.peer_ms(f"flex+mask T={t}", [lambda s=s: flex(*s, score_mod=softcap_mod, scale=SCALE, enable_gqa=True,
                                                                  block_mask=make_mask(window_mask, None, None, t, t,
                                                                                       device=r.device))
                                                  for s in sets])
        r.add("prefill", f"T={t} same, mask/ranges made per call", ours_in, tflops=flops / ours_in / 1e9,
              peer=peer_name + " + create_block_mask", peer_ms=peer_in)
        # SDPA computes the same function only without the soft-cap and the window
        ours_plain = r.bench_ms([lambda s=s: attention(*s, pos, pos, scale=SCALE) for s in sets])
        sdpa = r.peer_ms(f"SDPA T={t}", [lambda s=s: F.scaled_dot_product_attention(*s, is_causal=True, scale=SCALE,
                                                                                     enable_gqa=True) for s in sets])
        tf = 4 * head_dim * HQ * kept_pairs(t, None) / ours_plain / 1e9
        r.add("prefill", f"T={t} causal only", ours_plain, tflops=tf, peer="SDPA", peer_ms=sdpa,
              frac=tf / r.ceil["bf16_tflops"])
        del sets


def bench_decode(r: Runner):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from edgeslm.kernels.softcap_attention import attention, attention_reference

    dt = torch.bfloat16
    if r.device == "cuda":
        grid = [(b, s) for s in (1024, 4096, 16384, 32768) for b in (1, 4, 16, 64)]
        head_dim = HEAD_DIM
        flex = torch.compile(flex_attention, dynamic=False, mode=FLEX_MODE)
    else:
        grid, head_dim = [(1, 64), (2, 96)], 32
        flex = flex_attention

    def softcap_mod(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    for b, s in grid:
        if r.over_budget(f"decode B={b} S={s}"):
            continue
        kv_bytes = 2 * b * HKV * s * head_dim * 2
        sets = [(torch.randn(b, HQ, 1, head_dim, device=r.device, dtype=dt),
                 torch.randn(b, HKV, s, head_dim, device=r.device, dtype=dt),
                 torch.randn(b, HKV, s, head_dim, device=r.device, dtype=dt)) for _ in range(r.sets_for(kv_bytes, 64))]
        k_pos = torch.arange(s, device=r.device)
        q_pos = k_pos[-1:]
        err, ok = check(attention(*sets[0], q_pos, k_pos, scale=SCALE, softcap=SOFTCAP),
                        attention_reference(*sets[0], q_pos, k_pos, scale=SCALE, softcap=SOFTCAP), 3e-2)
        ms = r.bench_ms([lambda x=x: attention(*x, q_pos, k_pos, scale=SCALE, softcap=SOFTCAP) for x in sets])
        # every key is visible to the last position: flex needs no block mask, only the soft-cap
        peer = r.peer_ms(f"flex decode B={b} S={s}", [lambda x=x: flex(*x, score_mod=softcap_mod, scale=SCALE,
                                                                      enable_gqa=True) for x in sets])
        gbps = kv_bytes / ms / 1e6
        r.add("decode", f"B={b} S={s} global, softcap", ms, gbps=gbps, frac=gbps / r.ceil["copy_gbps"],
              frac_goal=GOALS["decode_frac_copy"] if (b, s) == (1, 32768) or r.device != "cuda" else None,
              peer="flex decoding" if r.device == "cuda" else "flex (eager)", peer_ms=peer, max_err=err, correct=ok)
        del sets
    # one local (window) layer at a long position: the ring buffer is all the kernel reads
    if r.device == "cuda" and not r.over_budget("decode ring"):
        b, s = 16, WINDOW
        k, v = (torch.randn(b, HKV, s, head_dim, device=r.device, dtype=dt) for _ in range(2))
        q = torch.randn(b, HQ, 1, head_dim, device=r.device, dtype=dt)
        written = 3 * WINDOW + 123
        idx = torch.arange(s, device=r.device)
        k_pos = (written - 1) - torch.remainder(written - 1 - idx, s)
        q_pos = torch.tensor([written - 1], device=r.device)
        kw = dict(scale=SCALE, softcap=SOFTCAP, window=WINDOW)
        err, ok = check(attention(q, k, v, q_pos, k_pos, **kw), attention_reference(q, k, v, q_pos, k_pos, **kw), 3e-2)
        ms = r.bench_ms([lambda: attention(q, k, v, q_pos, k_pos, **kw)])
        gbps = 2 * k.numel() * 2 / ms / 1e6
        r.add("decode", f"B={b} ring {s} at pos {written}", ms, gbps=gbps, frac=gbps / r.ceil["copy_gbps"],
              max_err=err, correct=ok)


# ---------------------------------------------------------------------------------------- int4


def bench_int4(r: Runner):
    import torch
    import torch.nn.functional as F

    from edgeslm.kernels.int4_matmul import int4_matmul, int4_matmul_reference

    dt = torch.bfloat16
    if r.device == "cuda":
        sizes, ms_list = (4096, 8192), (1, 16, 1024, 4096)
    else:
        sizes, ms_list = (256,), (1, 32)
    # (group, zero points): the symmetric grids at both group sizes, and the asymmetric path
    variants = ((32, False), (128, False), (128, True))
    for kn in sizes:
        for group, asym in variants:
            q_bytes = kn * kn // 2 + kn * (kn // group) * (3 if asym else 2)
            wsets = [(torch.randint(0, 256, (kn, kn // 2), dtype=torch.uint8, device=r.device),
                      (torch.rand(kn, kn // group, device=r.device) * 0.01 + 1e-3).half(),
                      torch.randint(0, 16, (kn, kn // group), dtype=torch.uint8, device=r.device) if asym else None)
                     for _ in range(r.sets_for(q_bytes))]
            bf16_sets = [torch.randn(kn, kn, dtype=dt, device=r.device) for _ in range(r.sets_for(kn * kn * 2))]
            for m in ms_list:
                if asym and m not in (1, 16, 1024):
                    continue
                tag = f"M={m} K=N={kn} G={group}" + (" zero points" if asym else "")
                if r.over_budget(f"int4 {tag}"):
                    continue
                x = torch.randn(m, kn, dtype=dt, device=r.device)
                w0 = wsets[0]
                err, ok = check(int4_matmul(x, *w0, group), int4_matmul_reference(x, *w0, group), 1.6e-2, rel=True)
                ours = r.bench_ms([lambda w=w: int4_matmul(x, *w, group) for w in wsets])
                peer = r.peer_ms("bf16 matmul", [lambda w=w: F.linear(x, w) for w in bf16_sets])
                if m <= 16:
                    gbps = (q_bytes + 2 * m * kn * 2) / ours / 1e6
                    gemv = m == 1  # the GEMV goals are set at M = 1
                    r.add("int4 GEMV" if gemv else "int4 small-M", tag, ours, gbps=gbps, peer="bf16 matmul",
                          peer_ms=peer, ratio_goal=GOALS["gemv_vs_bf16"] if gemv else None,
                          frac=gbps / r.ceil["copy_gbps"], frac_goal=GOALS["gemv_frac_copy"] if gemv else None,
                          max_err=err, correct=ok)
                else:
                    tf = 2 * m * kn * kn / ours / 1e9
                    r.add("int4 GEMM", tag, ours, tflops=tf, peer="bf16 matmul",
                          peer_ms=peer, ratio_goal=GOALS["gemm_vs_bf16"] if m >= 1024 else None,
                          frac=tf / r.ceil["bf16_tflops"], max_err=err, correct=ok)
            del wsets, bf16_sets


# ---------------------------------------------------------------------------------------- report


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows) -> str:
    head = ("part", "shape", "ms", "TFLOP/s", "GB/s", "peer", "x peer", "goal", "of measured ceiling",
            "of datasheet", "goal", "max err", "met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        met = "" if x["goal_met"] is None else ("yes" if x["goal_met"] else "NO")
        err = "" if x.get("max_err") is None else f"{x['max_err']:.2g}" + ("" if x["correct"] else " WRONG")
        lines.append("| " + " | ".join((
            x["part"], x["shape"], fmt(x["ms"], ".4f"), fmt(x["tflops"], ".1f"), fmt(x["gbps"], ".0f"), x["peer"] or "",
            fmt(x["ratio"], ".2f"), fmt(x["ratio_goal"], "g"), fmt(x["frac_ceiling"], ".0%"),
            fmt(x.get("frac_datasheet"), ".0%"), fmt(x["frac_goal"], ".0%"), err, met)) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks/kernels.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted kernel changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py: needs a CUDA GPU and none is visible (use --smoke to check the script on CPU)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU smoke run ({platform.processor() or 'cpu'})"
    r = Runner(args, device)
    parts = args.only or ["parity", "prefill", "decode", "int4"]
    measure_ceilings(r)
    parity = parity_check(r) if "parity" in parts else None
    # the headline prefill lengths first, 2k and 8k last: flex recompiles per length and the
    # budget must not starve decode and int4
    steps = [("prefill", bench_prefill), ("decode", bench_decode), ("int4", bench_int4)]
    if device == "cuda":
        steps.append(("prefill", lambda r: bench_prefill(r, [2048, 8192])))
    failed = []
    for name, fn in steps:
        if name in parts:
            try:
                fn(r)
            except Exception as e:  # noqa: BLE001 - keep the figures measured so far, report, exit 1
                failed.append(name)
                r.notes.append(f"{name} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                print("  " + r.notes[-1], file=sys.stderr, flush=True)
                if device == "cuda":
                    torch.cuda.synchronize()
    result = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  commit=git_commit(), torch=torch.__version__, triton=__import__("triton").__version__,
                  smoke=args.smoke, ceilings=r.ceil, datasheet=r.datasheet, goals=GOALS, parity=parity, rows=r.rows, skipped=r.skipped,
                  notes=r.notes, wall_s=round(time.perf_counter() - r.t0, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    text = table(r.rows)
    summary = [f"card: {card}; {result['date']}; commit {result['commit']}; torch {result['torch']}, "
               f"triton {result['triton']}; wall {result['wall_s']} s",
               f"ceilings: copy {r.ceil['copy_gbps']:.0f} GB/s, bf16 matmul {r.ceil['bf16_tflops']:.1f} TFLOP/s measured"
               + (f"; datasheet ({r.datasheet['card']}) {r.datasheet['copy_gbps']:.0f} GB/s, "
                  f"{r.datasheet['bf16_tflops']:.0f} TFLOP/s" if r.datasheet else "; no datasheet entry for this card"),
               "times: medians, " + ("in CUDA graphs (triton.testing.do_bench_cudagraph) unless a note says otherwise"
                                     if device == "cuda" and args.graphs else "eager" if device == "cuda"
                                     else "wall clock, CPU interpreter (meaningless)")]
    summary += r.notes
    if r.skipped:
        summary.append(f"skipped (over the {args.budget_s:g} s budget): " + ", ".join(r.skipped))
    print(json.dumps(result, indent=1) if args.json else "\n".join(summary) + "\n\n" + text)
    if args.record:
        section = (f"\n## Kernels (benchmarks/kernels.py), {card}, {result['date']}, commit {result['commit']}\n\n"
                   + "\n".join(f"- {s}" for s in summary) + "\n\n" + text + "\n")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
    failed_parity = parity is not None and not all(v["ok"] for v in parity.values())
    wrong = [x for x in r.rows if x.get("correct") is False]
    return 1 if failed_parity or failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
