"""Fused soft-capped, sliding-window, grouped-query attention.

Semantics (shared by the Triton kernels and `attention_reference`):
  q: [B, Hq, T, D], k/v: [B, Hkv, S, D], Hq % Hkv == 0 (query head h reads kv head h // (Hq//Hkv))
  q_pos: [T] absolute positions of the queries, k_pos: [S] absolute positions of the cache slots,
  -1 for an empty slot. Query t attends slot s iff 0 <= k_pos[s] <= q_pos[t] and, with a window W,
  q_pos[t] - k_pos[s] < W.
  scores = scale * q.k, then cap * tanh(scores / cap) when a soft-cap is given, then the mask,
  then softmax in fp32.

`attention_reference` is what the decoder runs off CUDA and what every export target traces.
`attention` is the Triton implementation (a prefill kernel and a one-launch split-KV decode kernel),
reached through edgeslm.ops on CUDA; tests run it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from ._tickets import split_tickets


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
    def _scores(q, k, c_scale, c_cap, HAS_SOFTCAP: tl.constexpr, DOT_MODE: tl.constexpr):
        """q @ k, scaled and soft-capped, in base 2 (log2(e) folded in) for exp2.

        Soft-cap: cap * tanh(y) with tanh(y) = 1 - 2 / (1 + e^(2y)): one exp2 and one approximate
        reciprocal (2 MUFU) per score. It saturates to +-cap without NaN (e = inf gives 1 - 0), and
        its absolute error stays at a few fp32 ulps of cap, under the bf16 rounding of P.
        c_scale = 2 log2(e) scale / cap, c_cap = cap log2(e) (without soft-cap: c_scale = scale log2(e)).
        """
        s = _dot(q, k, DOT_MODE)
        if HAS_SOFTCAP:
            e = tl.exp2(s * c_scale)
            return c_cap - tl.fdiv(2.0 * c_cap, 1.0 + e, approx=True)
        return s * c_scale

    @triton.jit
    def _attn_step(q, qp, m_i, l_i, acc, kp, k_ok, k_ptrs, v_ptrs, c_scale, c_cap, window,
                   MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_MODE: tl.constexpr):
        """One KV block of the online softmax. MASKED: partial block (positions decide each score,
        slots past S are not loaded); otherwise an interior block that the mask keeps whole, so
        there is no position arithmetic, no select and no bounds check."""
        if MASKED:
            k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _scores(q, k, c_scale, c_cap, HAS_SOFTCAP, DOT_MODE)
        if MASKED:
            allowed = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if HAS_WINDOW:
                allowed = allowed & (qp[:, None] - kp[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
            v = tl.load(v_ptrs)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
        return m_new, l_i, acc

    @triton.jit
    def _attn_range(q, qp, m_i, l_i, acc, lo, hi, k_base, v_base, KPOS, S, sks, svs, d_off,
                    c_scale, c_cap, window,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, DOT_MODE: tl.constexpr, NUM_STAGES: tl.constexpr):
        """KV blocks lo .. hi-1 in order: affine addresses, so the loads software-pipeline."""
        n_idx = tl.arange(0, BLOCK_N)
        for blk in tl.range(lo, hi, num_stages=NUM_STAGES):
            cols = blk * BLOCK_N + n_idx
            col_ok = cols < S
            kp = tl.load(KPOS + cols, mask=col_ok, other=-1).to(tl.int32) if MASKED else cols
            k_ptrs = k_base + cols.to(tl.int64)[None, :] * sks + d_off[:, None]
            v_ptrs = v_base + cols.to(tl.int64)[:, None] * svs + d_off[None, :]
            m_i, l_i, acc = _attn_step(q, qp, m_i, l_i, acc, kp, col_ok, k_ptrs, v_ptrs, c_scale, c_cap, window,
                                       MASKED, HAS_SOFTCAP, HAS_WINDOW, DOT_MODE)
        return m_i, l_i, acc

    @triton.jit
    def _load_q(Q, b, hk, pid_m, sqb, sqh, sqt, sqd, T, HQ: tl.constexpr, GROUP: tl.constexpr,
                HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, QPOS):
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T * GROUP
        t = rows // GROUP
        h = hk * GROUP + rows % GROUP
        d = tl.arange(0, HEAD_DIM)
        d_ok = d < D
        q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qp = tl.load(QPOS + t, mask=row_ok, other=-1).to(tl.int32)
        return q, qp, rows, row_ok, t, h, d, d_ok

    @triton.jit
    def _attn_prefill_kernel(
        Q, K, V, QPOS, KPOS, OUT, STATS, RANGES,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sot, sod,
        T, S, c_scale, c_cap, window,
        HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, COUNT_BLOCKS: tl.constexpr, DOT_MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one kv head (rows are (t, g) pairs, t-major, so the GQA
        group shares every K/V tile), over the KV blocks [lo, hi) that the mask leaves live, as three
        contiguous runs from RANGES[pid_m] = (lo, full_lo, full_hi, hi): partial blocks, blocks the
        mask keeps whole (no mask arithmetic), partial blocks. Which blocks are live and whole is
        decided from the positions (live_kv_ranges), so ring buffers work too."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query blocks (the most keys) start first
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        q, qp, rows, row_ok, t, h, d, d_ok = _load_q(Q, b, hk, pid_m, sqb, sqh, sqt, sqd, T, HQ, GROUP, HEAD_DIM, D,
                                                     BLOCK_M, QPOS)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        kd = d * skd
        vd = d * svd
        lo = tl.load(RANGES + pid_m * 4)
        f_lo = tl.load(RANGES + pid_m * 4 + 1)
        f_hi = tl.load(RANGES + pid_m * 4 + 2)
        hi = tl.load(RANGES + pid_m * 4 + 3)
        m_i, l_i, acc = _attn_range(q, qp, m_i, l_i, acc, lo, f_lo, k_base, v_base, KPOS, S, sks, svs, kd,
                                    c_scale, c_cap, window, BLOCK_N, True, HAS_SOFTCAP, HAS_WINDOW, DOT_MODE, NUM_STAGES)
        m_i, l_i, acc = _attn_range(q, qp, m_i, l_i, acc, f_lo, f_hi, k_base, v_base, KPOS, S, sks, svs, kd,
                                    c_scale, c_cap, window, BLOCK_N, False, HAS_SOFTCAP, HAS_WINDOW, DOT_MODE, NUM_STAGES)
        m_i, l_i, acc = _attn_range(q, qp, m_i, l_i, acc, f_hi, hi, k_base, v_base, KPOS, S, sks, svs, kd,
                                    c_scale, c_cap, window, BLOCK_N, True, HAS_SOFTCAP, HAS_WINDOW, DOT_MODE, NUM_STAGES)
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(OUT + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + t[:, None].to(tl.int64) * sot + d[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if COUNT_BLOCKS:
            tl.store(STATS + pid_bh * tl.num_programs(0) + pid_m, hi - lo)

    @triton.jit
    def _attn_decode_kernel(
        Q, K, V, QPOS, KPOS, OUT, PART, LSE, TICKET, STATS,
        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sot, sod,
        T, S, n_blocks, c_scale, c_cap, window,
        HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SCAN_J: tl.constexpr,
        ROWS: tl.constexpr, SPLITS_P2: tl.constexpr, MERGE_CHUNK: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, COUNT_BLOCKS: tl.constexpr, DOT_MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        """Decode (at most BLOCK_M query rows per kv head), one launch.

        Split s of NUM_SPLITS takes KV blocks s, s + NUM_SPLITS, s + 2 NUM_SPLITS, ... (interleaved:
        however long the live prefix of the cache is, the splits share it evenly). It first scans the
        positions of its blocks (SCAN_J blocks a step) for the first and last live one, then runs over
        that range without a branch, so K / V loads pipeline; the mask is applied per score. With
        NUM_SPLITS > 1 each split writes a normalized partial and its log2-sum-exp, and the last split
        of each (batch, kv head) to finish (an atomic ticket, re-armed after) merges them in split
        order: no second kernel."""
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        q, qp, rows, row_ok, t, h, d, d_ok = _load_q(Q, b, hk, 0, sqb, sqh, sqt, sqd, T, HQ, GROUP, HEAD_DIM, D,
                                                     BLOCK_M, QPOS)
        q_max = tl.max(tl.where(row_ok, qp, -1), axis=0)
        q_min = tl.min(tl.where(row_ok, qp, 2147483647), axis=0)
        # live range of this split's blocks j = 0, 1, ... (block pid_s + j * NUM_SPLITS)
        n_j = tl.cdiv(n_blocks - pid_s, NUM_SPLITS)
        jj = tl.arange(0, SCAN_J)
        n_idx = tl.arange(0, BLOCK_N)
        j_lo = n_j
        j_hi = 0
        for j0 in range(0, n_j, SCAN_J):
            j = j0 + jj
            cols = (pid_s + j * NUM_SPLITS)[:, None] * BLOCK_N + n_idx[None, :]
            ok = (j < n_j)[:, None] & (cols < S)
            kp = tl.load(KPOS + cols, mask=ok, other=-1).to(tl.int32)
            live = (kp >= 0) & (kp <= q_max)
            if HAS_WINDOW:
                live = live & (q_min - kp < window)
            blk_live = tl.max(live.to(tl.int32), axis=1) > 0
            j_lo = tl.minimum(j_lo, tl.min(tl.where(blk_live, j, n_j), axis=0))
            j_hi = tl.maximum(j_hi, tl.max(tl.where(blk_live, j + 1, 0), axis=0))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        for j in tl.range(j_lo, j_hi, num_stages=NUM_STAGES):
            cols = (pid_s + j * NUM_SPLITS) * BLOCK_N + n_idx
            col_ok = cols < S
            kp = tl.load(KPOS + cols, mask=col_ok, other=-1).to(tl.int32)
            k_ptrs = k_base + cols.to(tl.int64)[None, :] * sks + (d * skd)[:, None]
            v_ptrs = v_base + cols.to(tl.int64)[:, None] * svs + (d * svd)[None, :]
            m_i, l_i, acc = _attn_step(q, qp, m_i, l_i, acc, kp, col_ok, k_ptrs, v_ptrs, c_scale, c_cap, window,
                                       True, HAS_SOFTCAP, HAS_WINDOW, DOT_MODE)
        if COUNT_BLOCKS:
            tl.store(STATS + pid_s * tl.num_programs(0) + pid_bh, tl.maximum(j_hi - j_lo, 0))
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_ptrs = OUT + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + t[:, None].to(tl.int64) * sot + d[None, :] * sod
        o_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
        else:
            # partials of the first ROWS rows (the real ones, T * GROUP <= ROWS), fp32
            r = tl.arange(0, BLOCK_M)
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            prow = (pid_s * tl.num_programs(0) + pid_bh) * ROWS + r
            tl.store(PART + prow[:, None].to(tl.int64) * HEAD_DIM + d[None, :], out, mask=(r < ROWS)[:, None])
            tl.store(LSE + prow, lse, mask=r < ROWS)
            tl.debug_barrier()  # every thread's part is written before the ticket is taken
            ticket = tl.atomic_add(TICKET + pid_bh, 1, sem="acq_rel", scope="gpu")
            if ticket == NUM_SPLITS - 1:
                _merge_splits(PART, LSE, OUT, b, hk, pid_bh, tl.num_programs(0), T, sob, soh, sot, sod,
                              GROUP, HEAD_DIM, D, ROWS, NUM_SPLITS, SPLITS_P2, MERGE_CHUNK)
                tl.atomic_xchg(TICKET + pid_bh, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _merge_splits(PART, LSE, OUT, b, hk, pid_bh, n_bh, T, sob, soh, sot, sod,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, MERGE_CHUNK: tl.constexpr):
        """out = sum_s w_s part_s / sum_s w_s with w_s = 2**(lse_s - max lse), for this (batch, kv
        head)'s rows; all log2-sum-exps in one load, the partials MERGE_CHUNK splits a load, in
        split order (deterministic). Empty splits carry -inf and weigh 0."""
        r = tl.arange(0, ROWS)
        d = tl.arange(0, HEAD_DIM)
        sp = tl.arange(0, SPLITS_P2)
        lse_all = tl.load(LSE + (sp[:, None] * n_bh + pid_bh) * ROWS + r[None, :], mask=(sp < NUM_SPLITS)[:, None],
                          other=float("-inf"), cache_modifier=".cg")
        top = tl.max(lse_all, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp2(lse_all - top[None, :]), axis=0)
        res = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        c = tl.arange(0, MERGE_CHUNK)
        for s0 in range(0, NUM_SPLITS, MERGE_CHUNK):
            si = s0 + c
            s_ok = si < NUM_SPLITS
            prow = (si[:, None] * n_bh + pid_bh) * ROWS + r[None, :]  # [chunk, ROWS]
            w = tl.exp2(tl.load(LSE + prow, mask=s_ok[:, None], other=float("-inf"), cache_modifier=".cg") - top[None, :])
            part = tl.load(PART + prow[:, :, None].to(tl.int64) * HEAD_DIM + d[None, None, :], mask=s_ok[:, None, None],
                           other=0.0, cache_modifier=".cg")
            res += tl.sum(part * w[:, :, None], axis=0)
        res = res / tl.where(total > 0.0, total, 1.0)[:, None]
        t = r // GROUP
        h = hk * GROUP + r % GROUP
        tl.store(OUT + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + t[:, None].to(tl.int64) * sot + d[None, :] * sod,
                 res.to(OUT.dtype.element_ty), mask=(r < T * GROUP)[:, None] & (d < D)[None, :])

def dot_mode(dtype) -> int:
    """The _dot variant for an input dtype (see _dot)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and _interpreting():
        return 2
    return 0


def live_kv_ranges(q_pos, k_pos, group: int, block_m: int, block_n: int, n_m: int, window):
    """For each query block, int32 (lo, full_lo, full_hi, hi) [n_m, 4]: the KV blocks [lo, hi) hold
    every key the mask keeps for it, and [full_lo, full_hi) inside them are blocks the mask keeps
    whole (every slot filled, every key at or before every query, inside the window for all). A
    handful of small torch ops on the device, no host sync, made once for all heads and batch rows.
    Positions in slot order (a global cache, new keys) give contiguous live blocks; a ring buffer's
    rotation can leave dead blocks inside [lo, hi), which the masked loops then compute and discard."""
    t, s = q_pos.numel(), k_pos.numel()
    n_kv = -(-s // block_n)
    big = torch.iinfo(torch.int64).max
    kp = torch.full((n_kv * block_n,), -1, dtype=torch.int64, device=k_pos.device)
    kp[:s] = k_pos
    kp = kp.view(n_kv, block_n)
    k_max = kp.amax(1)  # -1 when the whole block is empty
    k_min = torch.where(kp >= 0, kp, big).amin(1)
    filled = (kp >= 0).all(1)
    rows = torch.arange(n_m * block_m, device=q_pos.device)
    qp = q_pos[torch.clamp(rows // group, max=t - 1)].view(n_m, block_m)
    valid = (rows < t * group).view(n_m, block_m)
    q_max = torch.where(valid, qp, -1).amax(1)
    q_min = torch.where(valid, qp, big).amin(1)
    live = (k_max >= 0)[None, :] & (k_min[None, :] <= q_max[:, None])
    full = filled[None, :] & (k_max[None, :] <= q_min[:, None])
    if window is not None:
        live &= (q_min[:, None] - k_max[None, :]) < window
        full &= (q_max[:, None] - k_min[None, :]) < window
    full &= live
    idx = torch.arange(n_kv, device=k_pos.device)

    def first_last(mask):
        first = torch.where(mask, idx, n_kv).amin(1)
        last = torch.where(mask, idx + 1, 0).amax(1)
        return first, torch.maximum(last, first)

    lo, hi = first_last(live)
    f_lo, f_hi = first_last(full)
    # the whole run must be whole blocks; otherwise everything goes through the masked loop
    run = torch.cumsum(full.to(torch.int32), 1)
    count = torch.gather(run, 1, (f_hi - 1).clamp(0, n_kv - 1)[:, None])[:, 0] - torch.where(
        f_lo > 0, torch.gather(run, 1, (f_lo - 1).clamp(0, n_kv - 1)[:, None])[:, 0], 0)
    ok = (f_hi > f_lo) & (count == f_hi - f_lo)
    f_lo = torch.where(ok, f_lo, hi)
    f_hi = torch.where(ok, f_hi, hi)
    lo = torch.minimum(lo, hi)
    return torch.stack((lo, f_lo, f_hi, hi), 1).to(torch.int32).contiguous()


def gpu_config(head_dim: int, dtype, decode: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA. Not timed yet (no GPU so far): chosen from
    the sm_90 builds (benchmarks/kernel_audit.py) as the largest tiles that compile without register
    spills with the loads software-pipelined. fp32 takes the FMA path (no tf32) and needs small tiles."""
    if dtype == torch.float32:
        if head_dim <= 64:
            return (16, 32, 4, 3) if decode else (32, 32, 8, 3)
        return (16, 32, 8, 3) if head_dim <= 128 else (16, 32, 4, 3)
    if decode:  # one KV stream per program; BLOCK_M = 16 is the smallest tl.dot tile
        return (16, 64, 4, 3) if head_dim <= 128 else (16, 32, 4, 3)
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 128, 32, 8, 3


def _sm_count(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 / H200


def decode_splits(b: int, hkv: int, n_blocks: int, sms: int) -> int:
    """KV splits for a decode launch: one program per SM (each keeps NUM_STAGES K / V tiles in
    flight, more than an SM needs to cover memory latency), at most one split per block. Splits are
    interleaved, so they share whatever prefix of the cache is live."""
    return max(1, min(triton.cdiv(sms, b * hkv), n_blocks))




def prefill_ranges(q, k, q_pos, k_pos, window=None, block_m=None, block_n=None):
    """The (lo, full_lo, full_hi, hi) table that `attention` computes for a prefill launch with these
    arguments, to pass back as kv_ranges= (benchmarks time this bookkeeping apart from the kernel,
    as they do FlexAttention's block-mask creation)."""
    group = q.shape[1] // k.shape[1]
    rows = q.shape[2] * group
    cfg = _launch_blocks(q.dtype, max(16, _next_pow2(q.shape[3])), rows, k.shape[2], decode=False)
    bm, bn = block_m or cfg[0], block_n or cfg[1]
    q_pos = q_pos.to(device=q.device, dtype=torch.int64)
    k_pos = k_pos.to(device=q.device, dtype=torch.int64)
    return live_kv_ranges(q_pos, k_pos, group, bm, bn, triton.cdiv(rows, bm), window)


def _launch_blocks(dtype, head_dim, rows, s, decode):
    if _interpreting():  # few, large blocks: interpreter time grows with programs x loop trips
        return min(128, max(16, _next_pow2(rows))), min(128, max(16, _next_pow2(s))), 4, 1
    return gpu_config(head_dim, dtype, decode)


def decode_constants(b: int, hkv: int, rows: int, n_blocks: int, block_n: int, head_dim: int, sms: int,
                     num_splits: int | None = None) -> dict:
    """The decode kernel's split constants for a launch (the launcher and benchmarks/kernel_audit.py
    both use this): splits, position-scan width (at most 2048 slots a step), merge rows and chunk."""
    if num_splits is None:
        num_splits = decode_splits(b, hkv, n_blocks, sms)
    num_splits = max(1, min(int(num_splits), n_blocks))
    rows_p2 = _next_pow2(rows)
    return dict(NUM_SPLITS=num_splits, SCAN_J=min(_next_pow2(triton.cdiv(n_blocks, num_splits)), max(1, 2048 // block_n)),
                ROWS=rows_p2, SPLITS_P2=_next_pow2(num_splits),
                MERGE_CHUNK=min(_next_pow2(num_splits), max(1, 8192 // (rows_p2 * head_dim))))


def attention(q, k, v, q_pos, k_pos, *, scale, softcap=None, window=None,
              block_m=None, block_n=None, num_splits=None, num_warps=None, num_stages=None,
              block_stats: list | None = None, out=None, kv_ranges=None):
    """The Triton kernels, same semantics as `attention_reference` (returns q.dtype).

    At most 16 query rows per kv head (decode) take the one-launch split-KV kernel; more rows take
    the prefill kernel. block_m/block_n/num_splits override the heuristics (the tests use them to
    get few, large blocks under the interpreter, and to force splits).
    block_stats, when a list, receives a tensor with the number of KV blocks each program computed
    (the tests check that masked-out blocks are skipped): [B * Hkv, n_m] for prefill,
    [num_splits, B * Hkv, 1] for decode.
    A query row that sees no key at all returns zeros (the reference returns NaN there).
    out: an optional [B, Hq, T, D] tensor of q's dtype to write into (tests poison it first).
    kv_ranges: prefill only, the table prefill_ranges() returns for the same arguments.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use attention_reference")
    out = _checked_out(q, k, v, q_pos, k_pos, out)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if b * hq * t == 0:
        return out
    group = hq // hkv
    head_dim = max(16, _next_pow2(d))
    rows = t * group
    decode = rows <= 16
    cfg = _launch_blocks(q.dtype, head_dim, rows, s, decode)
    block_m, block_n = block_m or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    if decode:
        block_m = max(16, _next_pow2(rows))
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    k_pos = k_pos.to(device=q.device, dtype=torch.int64).contiguous()
    if softcap is not None:
        c_scale, c_cap = 2.0 * _LOG2E * float(scale) / float(softcap), float(softcap) * _LOG2E
    else:
        c_scale, c_cap = float(scale) * _LOG2E, 0.0
    common = dict(HQ=hq, HKV=hkv, GROUP=group, HEAD_DIM=head_dim, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                  HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, COUNT_BLOCKS=block_stats is not None,
                  DOT_MODE=dot_mode(q.dtype), NUM_STAGES=num_stages, num_warps=num_warps, num_stages=num_stages)
    scalars = (c_scale, c_cap, int(window or 0))
    if not decode:
        return _launch_prefill(q, k, v, q_pos, k_pos, out, common, scalars, window, block_stats, kv_ranges)
    return _launch_decode(q, k, v, q_pos, k_pos, out, common, scalars, block_stats, num_splits)


def _checked_out(q, k, v, q_pos, k_pos, out):
    """Refuses shapes that do not fit; returns the output tensor to write (out, or a new one)."""
    b, hq, t, d = q.shape
    bk, hkv, s, dk = k.shape
    if v.shape != k.shape or bk != b or dk != d or hq % hkv:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if q_pos.shape != (t,) or k_pos.shape != (s,):
        raise ValueError(f"attention: q_pos {tuple(q_pos.shape)} / k_pos {tuple(k_pos.shape)} must be [T] / [S]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if out is None:
        return torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"attention: out {tuple(out.shape)} {out.dtype} must match q")
    return out


def _launch_prefill(q, k, v, q_pos, k_pos, out, common, scalars, window, block_stats, kv_ranges):
    b, t, s, hkv = q.shape[0], q.shape[2], k.shape[2], common["HKV"]
    n_m = triton.cdiv(t * common["GROUP"], common["BLOCK_M"])
    if kv_ranges is None:
        kv_ranges = live_kv_ranges(q_pos, k_pos, common["GROUP"], common["BLOCK_M"], common["BLOCK_N"], n_m, window)
    if kv_ranges.shape != (n_m, 4):
        raise ValueError(f"attention: kv_ranges {tuple(kv_ranges.shape)} do not fit {n_m} query blocks")
    stats = torch.zeros(b * hkv * n_m, dtype=torch.int32, device=q.device) if block_stats is not None else out
    _attn_prefill_kernel[(n_m, b * hkv)](
        q, k, v, q_pos, k_pos, out, stats, kv_ranges,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        t, s, *scalars, **common,
    )
    if block_stats is not None:
        block_stats.append(stats.view(b * hkv, n_m))
    return out


def _launch_decode(q, k, v, q_pos, k_pos, out, common, scalars, block_stats, num_splits):
    b, t, s, hkv = q.shape[0], q.shape[2], k.shape[2], common["HKV"]
    n_blocks = triton.cdiv(s, common["BLOCK_N"])
    dec = decode_constants(b, hkv, t * common["GROUP"], n_blocks, common["BLOCK_N"], common["HEAD_DIM"],
                           _sm_count(q.device), 1 if _interpreting() and num_splits is None else num_splits)
    num_splits, merge_rows = dec["NUM_SPLITS"], dec["ROWS"]
    if num_splits > 1:
        part = torch.empty(num_splits * b * hkv * merge_rows, common["HEAD_DIM"], dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits * b * hkv * merge_rows, dtype=torch.float32, device=q.device)
        tickets = split_tickets(q.device, b * hkv)
    else:
        part = lse = tickets = out  # unused
    stats = torch.zeros(num_splits * b * hkv, dtype=torch.int32, device=q.device) if block_stats is not None else out
    _attn_decode_kernel[(b * hkv, num_splits)](
        q, k, v, q_pos, k_pos, out, part, lse, tickets, stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        t, s, n_blocks, *scalars, **dec, **common,
    )
    if block_stats is not None:
        block_stats.append(stats.view(num_splits, b * hkv, 1))
    return out
