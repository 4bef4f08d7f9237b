"""Fused soft-capped, sliding-window, grouped-query attention.

Semantics (shared by the Triton kernels and `attention_reference`):
  q: [B, Hq, T, D], k/v: [B, Hkv, S, D], Hq % Hkv == 0 (query head h reads kv head h // (Hq//Hkv))
  q_pos: [T] absolute positions of the queries, k_pos: [S] absolute positions of the cache slots,
  -1 for an empty slot. Query t attends slot s iff 0 <= k_pos[s] <= q_pos[t] and, with a window W,
  q_pos[t] - k_pos[s] < W.
  scores = scale * q.k, then cap * tanh(scores / cap) when a soft-cap is given, then the mask,
  then softmax in fp32.

`attention_reference` is what the decoder runs off CUDA and what every export target traces.
`attention` is the Triton implementation (one kernel for prefill and decode, plus a split-KV merge
kernel), reached through edgeslm.ops on CUDA; tests run it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch


def attention_reference(q, k, v, q_pos, k_pos, *, scale, softcap=None, window=None):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    # [B, Hkv, G*T, D]: every query head of a group against its one kv head, no kv copies
    qg = q.reshape(b, hkv, group * t, d)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qp = q_pos.view(-1, 1)
    kp = k_pos.view(1, -1)
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    allowed = allowed.repeat(group, 1)  # rows are (g, t) in the same order as qg
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return out.reshape(b, hq, t, d)


# ---------------------------------------------------------------------------------------- Triton
# Hand-written: no maintained library covers soft-cap + position-carried (ring buffer) masks +
# GQA + split-KV decode together (FlexAttention comes closest; benchmarks/kernels.py compares).

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference above still works without Triton (macOS, export-only installs)
    triton = None

_LOG2E = 1.4426950408889634


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tl.math.tanh is missing under the interpreter; this form is exact to fp32 rounding for
        # the |x| that a soft-cap sees, and saturates cleanly to +-1.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _dot(a, b, DOT_MODE: tl.constexpr):
        # DOT_MODE 0: native (fp16/bf16 tensor cores); 1: fp32 without tf32; 2: upcast to fp32 first,
        # because Triton 3.9's interpreter computes garbage for a bf16 tl.dot (seen here).
        if DOT_MODE == 0:
            return tl.dot(a, b)
        elif DOT_MODE == 1:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _attn_block(q, qp, m_i, l_i, acc, cols, col_ok, kp, k_ok, k_base, v_base, sks, skd, svs, svd, d, d_ok,
                    qk_scale, softcap, window,
                    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_MODE: tl.constexpr):
        """One KV block of the online softmax: scores, soft-cap, mask by positions, rescale, P @ V."""
        k = tl.load(k_base + cols[None, :] * sks + d[:, None] * skd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, k, DOT_MODE)
        if HAS_SOFTCAP:
            s = softcap * _tanh(s * (qk_scale / softcap))
            s = s * 1.4426950408889634  # softmax in base 2
        else:
            s = s * (qk_scale * 1.4426950408889634)
        allowed = k_ok[None, :] & (kp[None, :] <= qp[:, None])
        if HAS_WINDOW:
            allowed = allowed & (qp[:, None] - kp[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svs + d[None, :] * svd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
        return m_new, l_i, acc

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, QPOS, KPOS, OUT, LSE, STATS, BLIST, BCOUNT,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sot, sod,
        T, S, HQ, HKV, blocks_per_split, n_kv_blocks,
        qk_scale, softcap, window,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, BLOCK_LIST: tl.constexpr,
        COUNT_BLOCKS: tl.constexpr, DOT_MODE: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one kv head (rows are (t, g) pairs, t-major, so the
        GQA group shares every K/V tile and a block's positions stay a contiguous run), over its
        split of the KV blocks that the mask leaves live.

        Which blocks are live is decided from the positions, so it holds for ring buffers too, and
        K/V of a dead block are never loaded nor computed:
          BLOCK_LIST (prefill): the launcher lists each query block's live KV blocks (BLIST, BCOUNT),
            so the loop has no branch and Triton can software-pipeline its loads;
          otherwise (decode): each block's positions are loaded and the block is skipped in-loop,
            which costs no extra launches (decode is latency bound).
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // HKV
        hk = pid_bh % HKV

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T * GROUP
        t = rows // GROUP
        h = hk * GROUP + rows % GROUP
        d = tl.arange(0, HEAD_DIM)
        d_ok = d < D

        q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qp = tl.load(QPOS + t, mask=row_ok, other=-1).to(tl.int32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        computed = 0

        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        first = pid_s * blocks_per_split
        if BLOCK_LIST:
            last = tl.minimum(first + blocks_per_split, tl.load(BCOUNT + pid_m))
            for i in range(first, last):
                blk = tl.load(BLIST + pid_m * n_kv_blocks + i)
                cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < S
                kp = tl.load(KPOS + cols, mask=col_ok, other=-1).to(tl.int32)
                m_i, l_i, acc = _attn_block(q, qp, m_i, l_i, acc, cols, col_ok, kp, kp >= 0, k_base, v_base,
                                            sks, skd, svs, svd, d, d_ok, qk_scale, softcap, window,
                                            HAS_SOFTCAP, HAS_WINDOW, DOT_MODE)
                if COUNT_BLOCKS:
                    computed += 1
        else:
            q_max = tl.max(tl.where(row_ok, qp, -1), axis=0)
            q_min = tl.min(tl.where(row_ok, qp, 2147483647), axis=0)
            last = tl.minimum(first + blocks_per_split, n_kv_blocks)
            for blk in range(first, last):
                cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < S
                kp = tl.load(KPOS + cols, mask=col_ok, other=-1).to(tl.int32)
                k_ok = kp >= 0
                k_max = tl.max(tl.where(k_ok, kp, -1), axis=0)
                k_min = tl.min(tl.where(k_ok, kp, 2147483647), axis=0)
                # live: some slot filled, some key not after every query, some key in a window
                live = (k_max >= 0) & (k_min <= q_max)
                if HAS_WINDOW:
                    live = live & (q_min - k_max < window)
                if live:
                    m_i, l_i, acc = _attn_block(q, qp, m_i, l_i, acc, cols, col_ok, kp, k_ok, k_base, v_base,
                                                sks, skd, svs, svd, d, d_ok, qk_scale, softcap, window,
                                                HAS_SOFTCAP, HAS_WINDOW, DOT_MODE)
                    if COUNT_BLOCKS:
                        computed += 1

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        if SPLIT:
            # partial result of this split: normalized output and its log2-sum-exp, fp32
            part = pid_s * (tl.num_programs(1) // HKV) * HQ * T
            prow = part + (b * HQ + h) * T + t
            tl.store(OUT + prow[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            tl.store(LSE + prow, lse, mask=row_ok)
        else:
            tl.store(OUT + b * sob + h[:, None] * soh + t[:, None] * sot + d[None, :] * sod,
                     out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if COUNT_BLOCKS:
            n_m = tl.num_programs(0)
            tl.store(STATS + (pid_s * tl.num_programs(1) + pid_bh) * n_m + pid_m, computed)

    @triton.jit
    def _attn_combine_kernel(
        PART, LSE, OUT, rows_total, num_splits, sob, soh, sot, sod, HQ, T,
        HEAD_DIM: tl.constexpr, D: tl.constexpr,
    ):
        """Merges the split-KV partials of one query row, one split at a time (an online
        log-sum-exp, so registers stay one HEAD_DIM vector however many splits there are)."""
        row = tl.program_id(0)
        d = tl.arange(0, HEAD_DIM)
        top = float("-inf")
        total = 0.0
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for i in range(num_splits):
            lse = tl.load(LSE + i * rows_total + row)
            new_top = tl.maximum(top, lse)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # empty splits carry -inf
            alpha = tl.exp2(top - safe)
            w = tl.exp2(lse - safe)
            part = tl.load(PART + (i * rows_total + row) * HEAD_DIM + d)
            acc = acc * alpha + part * w
            total = total * alpha + w
            top = new_top
        out = acc / tl.where(total > 0.0, total, 1.0)
        b = row // (HQ * T)
        h = (row // T) % HQ
        t = row % T
        tl.store(OUT + b * sob + h * soh + t * sot + d * sod, out.to(OUT.dtype.element_ty), mask=d < D)


def dot_mode(dtype) -> int:
    """The _dot variant for an input dtype (see _dot)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and _interpreting():
        return 2
    return 0


def live_kv_blocks(q_pos, k_pos, group: int, block_m: int, block_n: int, n_m: int, window):
    """For each query block, the KV blocks the mask leaves live, listed first (int32 [n_m, n_kv]),
    and how many there are (int32 [n_m]). A handful of small torch ops on the device, no host sync:
    the same decision the decode path makes in-kernel, made once for all heads and batch rows."""
    t, s = q_pos.numel(), k_pos.numel()
    n_kv = -(-s // block_n)
    kp = torch.full((n_kv * block_n,), -1, dtype=torch.int64, device=k_pos.device)
    kp[:s] = k_pos
    kp = kp.view(n_kv, block_n)
    k_max = kp.amax(1)  # -1 when the whole block is empty
    k_min = torch.where(kp >= 0, kp, torch.iinfo(torch.int64).max).amin(1)
    rows = torch.arange(n_m * block_m, device=q_pos.device)
    qp = q_pos[torch.clamp(rows // group, max=t - 1)].view(n_m, block_m)
    valid = (rows < t * group).view(n_m, block_m)
    q_max = torch.where(valid, qp, -1).amax(1)
    q_min = torch.where(valid, qp, torch.iinfo(torch.int64).max).amin(1)
    live = (k_max >= 0)[None, :] & (k_min[None, :] <= q_max[:, None])
    if window is not None:
        live &= (q_min[:, None] - k_max[None, :]) < window
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), live.sum(1, dtype=torch.int32)


def gpu_config(head_dim: int, dtype, decode: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA. Not timed yet (no GPU so far): chosen as
    the largest tiles that compile for sm_90 without register spills (tests/kernels/test_compile_sm90.py
    checks that). fp32 takes the FMA path (no tf32) and needs small tiles."""
    if dtype == torch.float32:
        return (16, 32, 4, 2) if decode or head_dim > 128 else (32, 32, 8, 2)
    if decode:  # one KV stream per program; BLOCK_M = 16 is the smallest tl.dot tile
        return 16, 64, 4 if head_dim <= 64 else 8, 2
    if head_dim <= 128:
        return 128, 64, 8, 2
    return 128, 32, 8, 2


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def attention(q, k, v, q_pos, k_pos, *, scale, softcap=None, window=None,
              block_m=None, block_n=None, num_splits=None, num_warps=None, num_stages=None,
              block_stats: list | None = None, out=None):
    """The Triton kernels, same semantics as `attention_reference` (returns q.dtype).

    T == 1 (decode) splits the KV sequence across programs when batch x kv heads is too small to
    fill the GPU, then merges the partials. block_m/block_n/num_splits override the heuristics (the
    tests use them to get few, large blocks under the interpreter, and to force splits).
    block_stats, when a list, receives a tensor with the number of KV blocks each program computed
    (the tests check that masked-out blocks are skipped).
    A query row that sees no key at all returns zeros (the reference returns NaN there).
    out: an optional [B, Hq, T, D] tensor of q's dtype to write into (tests poison it first).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use attention_reference")
    b, hq, t, d = q.shape
    bk, hkv, s, dk = k.shape
    if v.shape != k.shape or bk != b or dk != d or hq % hkv:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if q_pos.shape != (t,) or k_pos.shape != (s,):
        raise ValueError(f"attention: q_pos {tuple(q_pos.shape)} / k_pos {tuple(k_pos.shape)} must be [T] / [S]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    group = hq // hkv
    head_dim = max(16, _next_pow2(d))
    rows = t * group
    if out is None:
        out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"attention: out {tuple(out.shape)} {out.dtype} must match q")
    if b * hq * t == 0:
        return out
    interp = _interpreting()
    decode = rows <= 16
    if interp:  # few, large blocks: interpreter time grows with programs x loop trips
        cfg = (min(128, max(16, _next_pow2(rows))), min(128, max(16, _next_pow2(s))), 4, 1)
    else:
        cfg = gpu_config(head_dim, q.dtype, decode)
    block_m, block_n = block_m or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    n_m = triton.cdiv(rows, block_m)
    n_blocks = triton.cdiv(s, block_n)
    if num_splits is None:
        num_splits = 1
        if decode and not interp:
            # enough programs for ~2 waves; each split keeps at least 4 KV blocks
            want = triton.cdiv(2 * _sm_count(q.device), b * hkv * n_m)
            num_splits = max(1, min(want, n_blocks // 4))
    num_splits = max(1, min(int(num_splits), n_blocks))
    per_split = triton.cdiv(n_blocks, num_splits)
    num_splits = triton.cdiv(n_blocks, per_split)
    split = num_splits > 1
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    k_pos = k_pos.to(device=q.device, dtype=torch.int64).contiguous()
    if split:
        part = torch.empty(num_splits, b * hq * t, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits, b * hq * t, dtype=torch.float32, device=q.device)
        dest = part
    else:
        lse = dest = out
    block_list = not decode
    if block_list:
        blist, bcount = live_kv_blocks(q_pos, k_pos, group, block_m, block_n, n_m, window)
    else:
        blist = bcount = k_pos  # unused
    grid = (n_m, b * hkv, num_splits)
    stats = torch.zeros(grid[0] * grid[1] * grid[2], dtype=torch.int32, device=q.device) if block_stats is not None else out
    _attn_fwd_kernel[grid](
        q, k, v, q_pos, k_pos, dest, lse, stats, blist, bcount,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        t, s, hq, hkv, per_split, n_blocks,
        float(scale), float(softcap or 1.0), int(window or 0),
        GROUP=group, HEAD_DIM=head_dim, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, SPLIT=split, BLOCK_LIST=block_list,
        COUNT_BLOCKS=block_stats is not None, DOT_MODE=dot_mode(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _attn_combine_kernel[(b * hq * t,)](
            part, lse, out, b * hq * t, num_splits, *out.stride(), hq, t,
            HEAD_DIM=head_dim, D=d, num_warps=1 if head_dim <= 128 else 2,
        )
    if block_stats is not None:
        block_stats.append(stats.view(num_splits, b * hkv, n_m))
    return out
