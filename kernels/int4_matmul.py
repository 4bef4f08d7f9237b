"""int4 dequant-matmul over edgeslm's one packed int4 layout.

The packed layout (produced by edgeslm.quantizer, read by every target):
  W is [N, K] (out_features, in_features), quantized in groups of G consecutive k (G in 32/64/128).
  qweight: uint8 [N, K // 2]; byte j of row n holds k = 2j in its low nibble and k = 2j + 1 in its
           high nibble, unsigned codes 0..15. Row-major, so a row's codes are contiguous along K:
           a 16-byte load brings 32 codes of one row, one whole group at G = 32. Viewed as int32
           [N, K // 8] the same bytes hold k = 8i + j in nibble j (little-endian).
  scales:  float16 [N, K // G], row-major; a group's scale sits next to its neighbours'.
  zeros:   uint8 [N, K // G] integer zero points 0..15 (asymmetric), or None (symmetric: zero 8).
  W[n, k] = (qweight_code[n, k] - zero[n, k // G]) * scales[n, k // G]

This is byte for byte ONNX Runtime's MatMulNBits layout for bits=4 (block_size = G), so the ONNX
target passes our tensors through; GGUF Q4_0 and Core ML's blockwise shift-scale are re-packings
of the same codes, never re-quantizations.

`int4_matmul_reference` is what the decoder uses off CUDA and what export traces. `int4_matmul` is
the Triton implementation (reached through edgeslm.ops on CUDA): one dequant-matmul kernel with two
launch shapes, GEMV/split-K for M <= 16 (decode) and tiled GEMM for larger M (prefill), plus a
dX kernel behind an autograd Function so QLoRA can train adapters over the frozen int4 base.
"""

from __future__ import annotations

import dataclasses

import torch

from ._tickets import split_tickets


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (values 0..15) -> uint8 [N, K/2]."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def dequantize_int4(qweight, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_int4(qweight).to(torch.float32)
    n, k = codes.shape
    codes = codes.view(n, k // group_size, group_size)
    zero = 8.0 if zeros is None else zeros.to(torch.float32).unsqueeze(-1)
    w = (codes - zero) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(n, k).to(dtype)


def int4_matmul_reference(x, qweight, scales, zeros, group_size: int):
    w = dequantize_int4(qweight, scales, zeros, group_size, dtype=x.dtype)
    return torch.nn.functional.linear(x, w)


# ---------------------------------------------------------------------------------------- Triton
# Hand-written: the maintained int4 kernels (torchao, gemlite, Marlin) each want their own packed
# layout; ours is fixed by the export targets (MatMulNBits), so the kernel reads it as it is: as int32
# words [N, K / 8], word i of a row holding k = 8i + j in nibble j, so that a thread's 16-byte load
# brings 32 consecutive codes of one row (ORT's MatMulFloatInt4Kernel reads the same layout this way).
#
# Dequantization has no int-to-float conversion (I2F): OR-ing a nibble that sits in bits 4p..4p+3 of
# a word into the mantissa of the fp32 2**(23 - 4p) gives exactly 2**(23 - 4p) + code (the
# FasterTransformer / Marlin magic-number trick, in fp32), for p = 0..4; one subtraction then leaves
# code - zero exactly, and one multiplication by the fp16 scale (11 significant bits) is exact in fp32
# too. Rounding that to the activation dtype is the reference's one rounding (our scales are on the
# bf16 grid, see edgeslm.schemes.int4.scale_grid, so bf16 holds them exactly as well).

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference above still works without Triton
    triton = None


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_mode(dtype) -> int:
    # 0 native, 1 fp32 without tf32, 2 upcast first (Triton 3.9's interpreter miscomputes bf16 tl.dot)
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and _interpreting():
        return 2
    return 0


# Passed at run time rather than written as literals: ptxas would otherwise rematerialize the nibble
# masks with a MOV before every LOP3 (about a sixth more instructions in the GEMV loop).
NIBBLE_MASK = 0xF

if triton is not None:

    @triton.jit
    def _dot(a, b, DOT_MODE: tl.constexpr):
        if DOT_MODE == 0:
            return tl.dot(a, b)
        elif DOT_MODE == 1:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _code(src, nib, POS: tl.constexpr, off):
        """(nibble of src at bits 4*POS..4*POS+3) - zero, exact in fp32, without I2F.
        off = zero + 2**(23 - 4*POS)."""
        bits = (src & (nib << (4 * POS))) | ((150 - 4 * POS) << 23)
        return bits.to(tl.float32, bitcast=True) - off

    @triton.jit
    def _codes8(w, nib, z):
        """int32 words -> the 8 codes - zero of each word (fp32, exact), nibble order 0..7.
        Nibbles 0..4 are read in place; 5..7 from the word shifted right by 12 (positions 2..4)."""
        hi = w >> 12
        c0 = _code(w, nib, 0, z + 8388608.0)
        c1 = _code(w, nib, 1, z + 524288.0)
        c2 = _code(w, nib, 2, z + 32768.0)
        c3 = _code(w, nib, 3, z + 2048.0)
        c4 = _code(w, nib, 4, z + 128.0)
        c5 = _code(hi, nib, 2, z + 32768.0)
        c6 = _code(hi, nib, 3, z + 2048.0)
        c7 = _code(hi, nib, 4, z + 128.0)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _interleave8(c0, c1, c2, c3, c4, c5, c6, c7):
        """8 tensors [R, W] -> [R, W * 8] with element 8w + j taken from c_j (natural k order)."""
        e0 = tl.join(c0, c4)
        e1 = tl.join(c1, c5)
        e2 = tl.join(c2, c6)
        e3 = tl.join(c3, c7)
        f0 = tl.join(e0, e2)
        f1 = tl.join(e1, e3)
        g = tl.join(f0, f1)  # [R, W, j2, j1, j0] with j = 4 j2 + 2 j1 + j0
        return g.reshape(g.shape[0], g.shape[1] * 8)

    @triton.jit
    def _dequant_tile(w, s, z, nib, WORDS: tl.constexpr, GROUP: tl.constexpr, dtype):
        """int32 words [R, WORDS] with per-group scales / zeros [R, WORDS * 8 // GROUP] (fp32) ->
        weights [R, WORDS * 8] in dtype, k in natural order; each value (code - zero) * scale in
        fp32, rounded once, as the reference computes it."""
        GW: tl.constexpr = GROUP // 8  # words per group
        R: tl.constexpr = w.shape[0]
        sw = tl.broadcast_to(s[:, :, None], [R, WORDS // GW, GW]).reshape(R, WORDS)
        zw = tl.broadcast_to(z[:, :, None], [R, WORDS // GW, GW]).reshape(R, WORDS)
        c0, c1, c2, c3, c4, c5, c6, c7 = _codes8(w, nib, zw)
        return _interleave8((c0 * sw).to(dtype), (c1 * sw).to(dtype), (c2 * sw).to(dtype), (c3 * sw).to(dtype),
                            (c4 * sw).to(dtype), (c5 * sw).to(dtype), (c6 * sw).to(dtype), (c7 * sw).to(dtype))

    @triton.jit
    def _u8_to_f32(v):
        """uint8 -> fp32 without I2F: 2**23 + v, minus 2**23."""
        return (v.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _mag(src, mask, MAGIC: tl.constexpr):
        return ((src & mask) | MAGIC).to(tl.float32, bitcast=True)

    @triton.jit
    def _split_finish(y, Y, syn, PART, TICKET, n, n_ok, N, pid_n, pid_k, SPLIT_K: tl.constexpr):
        """Writes y [BLOCK_N] fp32 (this program's part of Y[n]); with SPLIT_K > 1 the part goes to
        PART[pid_k], and the last of the SPLIT_K programs of this tile (an atomic ticket) sums the
        parts in split order (deterministic) into Y and re-arms the ticket: one launch, no zeroing."""
        if SPLIT_K == 1:
            tl.store(Y + n * syn, y.to(Y.dtype.element_ty), mask=n_ok)
        else:
            tl.store(PART + pid_k * N + n, y, mask=n_ok)
            tl.debug_barrier()  # every thread's part is written before the ticket is taken
            ticket = tl.atomic_add(TICKET + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT_K - 1:
                tot = tl.zeros_like(y)
                for i in range(SPLIT_K):
                    tot += tl.load(PART + i * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
                tl.store(Y + n * syn, tot.to(Y.dtype.element_ty), mask=n_ok)
                tl.atomic_xchg(TICKET + pid_n, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _int4_gemv_kernel(
        X, QW, SC, ZP, Y, PART, TICKET, N, K, words_per_split, nib,
        sxk, sqw, ssn, szn, syn,
        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):
        """y[N] = x[K] @ dequant(W)[N, K].T for one activation row (M = 1), on the FMA units: no
        tensor-core tile to pad, no shared-memory round trip for the weights.

        A K step reads BLOCK_K / 2 bytes of each of BLOCK_N rows as [BLOCK_N, BLOCK_K / 32, 4] int32
        (each thread: 16 bytes = 32 codes = one chunk of one row) and the matching 32 x values per chunk;
        a chunk lies in one group, so its scale (and zero) is loaded once and applied to the chunk's
        dot product. EXACT (fp32 activations): every code - zero is exact (_codes8). Otherwise
        (fp16 / bf16 activations) the codes are read at bits 12..15 (2048 + code) or 16..19 (128 + code)
        with one shift per two codes and no subtraction; the chunk's sum of 2048 / 128 / zero times x is
        subtracted once per chunk. That cancellation costs ~2**-13 relative in fp32, far below the
        reference's own rounding of each weight to bf16 / fp16.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        C: tl.constexpr = BLOCK_K // 32  # chunks of 32 codes (4 words) per row per step
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        c = tl.arange(0, C)
        wi = tl.arange(0, 4)
        j8 = tl.arange(0, 8)
        row = n.to(tl.int64) * sqw
        acc = tl.zeros([BLOCK_N, C], tl.float32)
        kw_lo = pid_k * words_per_split
        kw_hi = tl.minimum(kw_lo + words_per_split, K // 8)
        for kw0 in tl.range(kw_lo, kw_hi, BLOCK_K // 8, num_stages=NUM_STAGES):
            cw = kw0 + 4 * c  # first word of each chunk
            c_ok = cw < kw_hi
            w = tl.load(QW + row[:, None, None] + (cw[None, :, None] + wi[None, None, :]),
                        mask=n_ok[:, None, None] & c_ok[None, :, None], other=0)  # [BN, C, 4]
            kx = (8 * cw)[:, None, None] + 8 * wi[None, :, None] + j8[None, None, :]
            xv = tl.load(X + kx.to(tl.int64) * sxk, mask=c_ok[:, None, None], other=0.0).to(tl.float32)
            xa, xb = tl.split(xv.reshape(C, 4, 2, 2, 2))  # nibble j = 4 j2 + 2 j1 + j0: split j0, j1, j2
            xa0, xa1 = tl.split(xa)
            xb0, xb1 = tl.split(xb)
            x0, x4 = tl.split(xa0)
            x2, x6 = tl.split(xa1)
            x1, x5 = tl.split(xb0)
            x3, x7 = tl.split(xb1)
            g = (8 * cw) // GROUP
            gmask = n_ok[:, None] & c_ok[None, :]
            s = tl.load(SC + n[:, None] * ssn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = _u8_to_f32(tl.load(ZP + n[:, None] * szn + g[None, :], mask=gmask, other=0))
            else:
                z = tl.full([BLOCK_N, C], 8.0, tl.float32)
            if EXACT:
                c0, c1, c2, c3, c4, c5, c6, c7 = _codes8(w, nib, z[:, :, None])
                p = c0 * x0[None]
                p += c1 * x1[None]
                p += c2 * x2[None]
                p += c3 * x3[None]
                p += c4 * x4[None]
                p += c5 * x5[None]
                p += c6 * x6[None]
                p += c7 * x7[None]
                dotc = tl.sum(p, axis=2)
            else:
                m3 = nib << 12
                m4 = nib << 16
                a = w << 8  # codes 1, 2 at bits 12.., 16..
                b = w >> 8  # codes 5, 6
                r = (w << 16) | ((w >> 16) & 0xFFFF)  # halves swapped: code 7 at bits 12.., code 0 at 16..
                p = _mag(r, m4, 0x43000000) * x0[None]
                p += _mag(a, m3, 0x45000000) * x1[None]
                p += _mag(a, m4, 0x43000000) * x2[None]
                p += _mag(w, m3, 0x45000000) * x3[None]
                p += _mag(w, m4, 0x43000000) * x4[None]
                p += _mag(b, m3, 0x45000000) * x5[None]
                p += _mag(b, m4, 0x43000000) * x6[None]
                p += _mag(r, m3, 0x45000000) * x7[None]
                s3 = x1 + x3 + x5 + x7  # x under codes read as 2048 + code
                s4 = x0 + x2 + x4 + x6  # ... as 128 + code
                xs = tl.sum(s3 + s4, axis=1)
                mc = tl.sum(s3 * 2048.0 + s4 * 128.0, axis=1)
                dotc = tl.sum(p, axis=2) - mc[None, :] - z * xs[None, :]
            acc += s * dotc
        _split_finish(tl.sum(acc, axis=1), Y, syn, PART, TICKET, n, n_ok, N, pid_n, pid_k, SPLIT_K)

    @triton.jit
    def _int4_mm_kernel(
        X, QW, SC, ZP, Y, PART, TICKET, M, N, K, words_per_split, nib,
        sxm, sxk, sqw, ssn, szn, sym, syn,
        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        """Y[M, N] = X[M, K] @ dequant(W)[N, K].T on the tensor cores: each K step loads
        [BLOCK_N, BLOCK_K / 8] int32 words (16-byte loads), the step's scales / zeros once per group,
        dequantizes to the activation dtype in natural k order and runs one K = BLOCK_K dot.
        SPLIT_K > 1 (small M) writes fp32 parts that the tile's last program sums (_split_finish)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        WORDS: tl.constexpr = BLOCK_K // 8
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < M
        n_ok = n < N
        wcol = tl.arange(0, WORDS)
        kcol = tl.arange(0, BLOCK_K)
        gcol = tl.arange(0, BLOCK_K // GROUP) if BLOCK_K >= GROUP else tl.arange(0, 1)
        x_row = X + m.to(tl.int64)[:, None] * sxm
        w_row = QW + n.to(tl.int64)[:, None] * sqw
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # Y tile transposed: the weights are the A operand
        kw_lo = pid_k * words_per_split
        kw_hi = tl.minimum(kw_lo + words_per_split, K // 8)
        for kw0 in tl.range(kw_lo, kw_hi, WORDS, num_stages=NUM_STAGES):
            k = 8 * kw0 + kcol
            # K ends on a whole chunk of 32 codes: masks constant over 4 words / 32 k keep loads 16 bytes wide
            x_ok = m_ok[:, None] & ((8 * kw0 + kcol // 32 * 32) < 8 * kw_hi)[None, :]
            x = tl.load(x_row + k[None, :].to(tl.int64) * sxk, mask=x_ok, other=0.0)
            words = kw0 + wcol
            w_ok = n_ok[:, None] & ((kw0 + wcol // 4 * 4) < kw_hi)[None, :]
            w = tl.load(w_row + words[None, :], mask=w_ok, other=0)  # [BN, WORDS]
            g = (8 * kw0) // GROUP + gcol
            g_ok = n_ok[:, None] & (g * GROUP < 8 * kw_hi)[None, :]
            s = tl.load(SC + n[:, None] * ssn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = _u8_to_f32(tl.load(ZP + n[:, None] * szn + g[None, :], mask=g_ok, other=0))
            else:
                z = tl.full([BLOCK_N, BLOCK_K // GROUP if BLOCK_K >= GROUP else 1], 8.0, tl.float32)
            wt = _dequant_tile(w, s, z, nib, WORDS, GROUP if BLOCK_K >= GROUP else BLOCK_K, x.dtype)
            acc_t += _dot(wt, tl.trans(x), DOT_MODE)
        acc = tl.trans(acc_t)
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(Y + m.to(tl.int64)[:, None] * sym + n[None, :] * syn, acc.to(Y.dtype.element_ty), mask=mask)
        else:
            part = PART + (pid_k * M).to(tl.int64) * N + m.to(tl.int64)[:, None] * N + n[None, :]
            tl.store(part, acc, mask=mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKET + pid, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT_K - 1:
                tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for i in range(SPLIT_K):
                    tot += tl.load(part + ((i - pid_k) * M).to(tl.int64) * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(Y + m.to(tl.int64)[:, None] * sym + n[None, :] * syn, tot.to(Y.dtype.element_ty), mask=mask)
                tl.atomic_xchg(TICKET + pid, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _int4_mm_dx_kernel(
        DY, QW, SC, ZP, DX, M, N, K, nib,
        sdym, sdyn, sqw, ssn, szn, sdxm, sdxk,
        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        """DX[M, K] = DY[M, N] @ dequant(W)[N, K]: tiles over (M, K), loop over N."""
        pid = tl.program_id(0)
        k_tiles = tl.cdiv(K, BLOCK_K)
        pid_m = pid // k_tiles
        pid_k = pid % k_tiles
        WORDS: tl.constexpr = BLOCK_K // 8
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        words = pid_k * WORDS + tl.arange(0, WORDS)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        gk: tl.constexpr = GROUP if BLOCK_K >= GROUP else BLOCK_K  # k per scale in this tile
        g = (pid_k * BLOCK_K) // GROUP + tl.arange(0, BLOCK_K // gk)  # group indices
        m_ok = m < M
        k_ok = k < K
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < N
            dy = tl.load(DY + m.to(tl.int64)[:, None] * sdym + n[None, :] * sdyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(QW + n.to(tl.int64)[:, None] * sqw + words[None, :],
                        mask=n_ok[:, None] & ((pid_k * WORDS + tl.arange(0, WORDS) // 4 * 4) < K // 8)[None, :], other=0)
            g_ok = n_ok[:, None] & (g * GROUP < K)[None, :]
            s = tl.load(SC + n[:, None] * ssn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = _u8_to_f32(tl.load(ZP + n[:, None] * szn + g[None, :], mask=g_ok, other=0))
            else:
                z = tl.full([BLOCK_N, BLOCK_K // gk], 8.0, tl.float32)
            wt = _dequant_tile(w, s, z, nib, WORDS, gk, dy.dtype)  # [BN, BK]
            acc += _dot(dy, wt, DOT_MODE)
        tl.store(DX + m.to(tl.int64)[:, None] * sdxm + k[None, :] * sdxk, acc.to(DX.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])


def _check(x, qweight, scales, zeros, group_size):
    n, half_k = qweight.shape
    k = 2 * half_k
    if qweight.dtype != torch.uint8 or x.shape[-1] != k:
        raise ValueError(f"int4_matmul: x [..., {x.shape[-1]}] against qweight {tuple(qweight.shape)} {qweight.dtype}")
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"int4_matmul: group size {group_size} must be 32/64/128 and divide K = {k}")
    if scales.shape != (n, k // group_size) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"int4_matmul: scales {tuple(scales.shape)} / zeros do not match [N, K/G] = [{n}, {k // group_size}]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int4_matmul: activations must be fp16/bf16/fp32, not {x.dtype}")
    return n, k


@dataclasses.dataclass(frozen=True)
class Plan:
    """One launch: which kernel, its tiles, split-K and grid. Pure arithmetic on the shape, so that
    benchmarks/kernel_audit.py compiles and estimates exactly what the launcher runs."""

    kernel: str  # "gemv" | "mm" | "dx"
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    grid: tuple
    words_per_split: int = 0


def _sm_count(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 / H200


def gpu_config(m: int, n: int, k: int, dtype, backward: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA, keyed by shape. Not timed yet (no
    GPU so far): chosen from the sm_90 builds (benchmarks/kernel_audit.py) as the largest tiles that
    compile without spills, with 16-byte weight loads and the software pipeline kept in flight."""
    if backward:
        if dtype == torch.float32:
            return 16, 32, 64, 2, 3
        return (16, 64, 128, 4, 3) if m <= 16 else (64, 64, 128, 8, 3)
    if m == 1:  # GEMV on the FMA units: 8 rows x 32 codes per thread per K step (4 for fp32)
        return (1, 64, 256, 4, 3) if dtype == torch.float32 else (1, 128, 256, 4, 3)
    if dtype == torch.float32:  # fp32 dots run on the FMA units (no tf32): small tiles
        return 16, 64, 64, 4, 3
    # tensor cores, weights as the wgmma A operand (BLOCK_N = its M, 64 per warpgroup) and the
    # activations as B (BLOCK_M = its N, up to 256)
    if m <= 16:  # split-K fills the GPU
        return 16, 128, 128, 4, 3
    if m <= 64:
        return 64, 128, 64, 4, 3
    if m <= 128:
        return 128, 128, 64, 8, 3
    return 256, 128, 64, 8, 3


def plan_forward(m: int, n: int, k: int, dtype, sms: int = 132, interpret: bool = False, **override) -> Plan:
    """The launch for x [M, K] @ W[N, K].T. override: block_m/block_n/block_k/split_k/num_warps/num_stages."""
    if interpret:  # few, large blocks: interpreter time grows with programs x loop trips
        bm, bn, bk, nw, ns = max(16, min(64, _next_pow2(m))), max(16, min(128, _next_pow2(n))), max(32, min(256, _next_pow2(k))), 4, 1
        if m == 1:
            bm = 1
    else:
        bm, bn, bk, nw, ns = gpu_config(m, n, k, dtype)
    bm = override.get("block_m") or bm
    bn, bk = override.get("block_n") or bn, override.get("block_k") or bk
    nw, ns = override.get("num_warps") or nw, override.get("num_stages") or ns
    if bk % 32 or bk & (bk - 1):
        raise ValueError(f"int4_matmul: block_k {bk} must be a power of two >= 32")
    kind = "gemv" if bm == 1 else "mm"
    n_tiles = triton.cdiv(n, bn) * (1 if kind == "gemv" else triton.cdiv(m, bm))
    split_k = override.get("split_k")
    if split_k is None:
        split_k = 1
        if m <= 16 and not interpret:  # split K until the grid holds up to 2 programs per SM (one wave), >= 2 K steps each
            split_k = max(1, min((2 * sms) // n_tiles, k // (2 * bk)))
    words = triton.cdiv(triton.cdiv(k, split_k), bk) * bk // 8  # whole K steps per split
    split_k = triton.cdiv(k // 8, words)
    return Plan(kind, bm, bn, bk, split_k, nw, ns, (n_tiles, split_k), words)




def _launch_forward(x2, qweight, scales, zeros, group_size, n, k, out=None, **config):
    m = x2.shape[0]
    if out is not None and (out.dtype != x2.dtype or out.numel() != m * n or not out.is_contiguous()):
        raise ValueError(f"int4_matmul: out must be a contiguous {x2.dtype} tensor of {m} x {n}")
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if out is None else out.view(m, n)
    if m == 0:
        return y
    config = {key: v for key, v in config.items() if v is not None}
    if m != 1 and config.get("block_m") == 1:
        raise ValueError("int4_matmul: block_m = 1 (the GEMV) needs M = 1")
    p = plan_forward(m, n, k, x2.dtype, _sm_count(x2.device), _interpreting(), **config)
    qw = qweight.view(torch.int32)  # [N, K / 8]: word i holds k = 8i + j in nibble j
    z = zeros if zeros is not None else scales
    part = torch.empty(p.split_k, m, n, dtype=torch.float32, device=x2.device) if p.split_k > 1 else y
    tickets = split_tickets(x2.device, p.grid[0]) if p.split_k > 1 else y
    common = dict(GROUP=group_size, HAS_ZEROS=zeros is not None, SPLIT_K=p.split_k, BLOCK_N=p.block_n,
                  BLOCK_K=p.block_k, NUM_STAGES=p.num_stages, num_warps=p.num_warps, num_stages=p.num_stages)
    if p.kernel == "gemv":
        _int4_gemv_kernel[p.grid](
            x2, qw, scales, z, y, part, tickets, n, k, p.words_per_split, NIBBLE_MASK,
            x2.stride(1), qw.stride(0), scales.stride(0), z.stride(0), y.stride(1),
            EXACT=x2.dtype == torch.float32, **common,
        )
    else:
        _int4_mm_kernel[p.grid](
            x2, qw, scales, z, y, part, tickets, m, n, k, p.words_per_split, NIBBLE_MASK,
            x2.stride(0), x2.stride(1), qw.stride(0), scales.stride(0), z.stride(0), y.stride(0), y.stride(1),
            BLOCK_M=p.block_m, DOT_MODE=_dot_mode(x2.dtype), **common,
        )
    return y


def plan_dx(m: int, n: int, k: int, dtype, interpret: bool = False, **override) -> Plan:
    if interpret:
        bm, bn, bk, nw, ns = max(16, min(64, _next_pow2(m))), max(16, min(128, _next_pow2(n))), max(32, min(256, _next_pow2(k))), 4, 1
    else:
        bm, bn, bk, nw, ns = gpu_config(m, n, k, dtype, backward=True)
    bm, bn, bk = override.get("block_m") or bm, override.get("block_n") or bn, override.get("block_k") or bk
    return Plan("dx", bm, bn, bk, 1, nw, ns, (triton.cdiv(m, bm) * triton.cdiv(k, bk),))


def _launch_dx(dy2, qweight, scales, zeros, group_size, n, k, **config):
    m = dy2.shape[0]
    dx = torch.empty(m, k, dtype=dy2.dtype, device=dy2.device)
    if m == 0:
        return dx
    p = plan_dx(m, n, k, dy2.dtype, _interpreting(), **{key: v for key, v in config.items() if v is not None})
    qw = qweight.view(torch.int32)
    z = zeros if zeros is not None else scales
    _int4_mm_dx_kernel[p.grid](
        dy2, qw, scales, z, dx, m, n, k, NIBBLE_MASK,
        dy2.stride(0), dy2.stride(1), qw.stride(0), scales.stride(0), z.stride(0), dx.stride(0), dx.stride(1),
        GROUP=group_size, HAS_ZEROS=zeros is not None, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k,
        DOT_MODE=_dot_mode(dy2.dtype), NUM_STAGES=p.num_stages, num_warps=p.num_warps, num_stages=p.num_stages,
    )
    return dx


class Int4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T with a backward for x only: W is a frozen quantized base (QLoRA)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, group_size, config):
        n, k = _check(x, qweight, scales, zeros, group_size)
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.group_size, ctx.x_shape = group_size, x.shape
        y = _launch_forward(x.reshape(-1, k), qweight, scales, zeros, group_size, n, k, **config)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        qweight, scales, zeros = ctx.saved_tensors
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        dx = _launch_dx(dy.reshape(-1, n), qweight, scales, zeros, ctx.group_size, n, k)
        return dx.view(ctx.x_shape), None, None, None, None, None


def int4_matmul(x, qweight, scales, zeros, group_size: int, **config):
    """The Triton kernel, same semantics as `int4_matmul_reference`; differentiable in x.

    config (block_m, block_n, block_k, split_k, num_warps, num_stages) overrides the launch
    heuristics; the tests use it to force split-K and K steps that do not divide K. config may
    also hold out=, a contiguous [..., N] tensor of x's dtype to write into (tests poison it).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use int4_matmul_reference")
    if torch.is_grad_enabled() and x.requires_grad:
        return Int4Matmul.apply(x, qweight, scales, zeros, group_size, config)
    n, k = _check(x, qweight, scales, zeros, group_size)
    y = _launch_forward(x.reshape(-1, k), qweight, scales, zeros, group_size, n, k, **config)
    return y.view(*x.shape[:-1], n)
