"""int4 dequant-matmul over edgeslm's one packed int4 layout.

The packed layout (produced by edgeslm.quantize, read by every target):
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

import torch


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
# layout; ours is fixed by the export targets (MatMulNBits), so the kernel reads it as it is.

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
    def _dequant_pair(packed, scale, zero, dtype):
        """uint8 bytes -> (even-k weights, odd-k weights), each (code - zero) * scale in fp32, then
        cast to the activation dtype, as the reference does."""
        lo = (packed & 0x0F).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        return ((lo - zero) * scale).to(dtype), ((hi - zero) * scale).to(dtype)

    @triton.jit
    def _int4_mm_kernel(
        X, QW, SC, ZP, Y, M, N, K, k_per_split,
        sxm, sxk, sqn, ssn, szn, sym, syn,
        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr,
    ):
        """Y[M, N] (or fp32 split-K partials [SPLIT_K, M, N]) = X[M, K] @ dequant(W)[N, K].T.

        A K step of BLOCK_K reads BLOCK_K/2 contiguous bytes of each of BLOCK_N weight rows. The
        even and odd k of those bytes are two half-width dots against X's even and odd columns,
        which avoids interleaving nibbles in registers.
        """
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_K // 2)
        m_ok = m < M
        n_ok = n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_even = k0 + 2 * j  # K is even, so k_even < K implies k_even + 1 < K
            k_ok = k_even < k_hi
            xe = tl.load(X + m[:, None] * sxm + k_even[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xo = tl.load(X + m[:, None] * sxm + (k_even + 1)[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            packed = tl.load(QW + n[None, :] * sqn + (k_even // 2)[:, None], mask=w_mask, other=0)  # [BK/2, BN]
            g = (k_even // GROUP)[:, None]
            scale = tl.load(SC + n[None, :] * ssn + g, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(ZP + n[None, :] * szn + g, mask=w_mask, other=0).to(tl.float32)
            else:
                zero = 8.0
            we, wo = _dequant_pair(packed, scale, zero, xe.dtype)
            acc += _dot(xe, we, DOT_MODE)
            acc += _dot(xo, wo, DOT_MODE)
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(Y + m[:, None] * sym + n[None, :] * syn, acc.to(Y.dtype.element_ty), mask=mask)
        else:
            tl.store(Y + pid_k * M * N + m[:, None] * N + n[None, :], acc, mask=mask)

    @triton.jit
    def _int4_mm_dx_kernel(
        DY, QW, SC, ZP, DX, M, N, K,
        sdym, sdyn, sqn, ssn, szn, sdxm, sdxk,
        GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr,
    ):
        """DX[M, K] = DY[M, N] @ dequant(W)[N, K]: tiles over (M, K), loop over N."""
        pid = tl.program_id(0)
        k_tiles = tl.cdiv(K, BLOCK_K)
        pid_m = pid // k_tiles
        pid_k = pid % k_tiles
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        j = tl.arange(0, BLOCK_K // 2)
        k_even = pid_k * BLOCK_K + 2 * j
        m_ok = m < M
        k_ok = k_even < K
        g = (k_even // GROUP)[None, :]
        acc_e = tl.zeros([BLOCK_M, BLOCK_K // 2], tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_K // 2], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < N
            dy = tl.load(DY + m[:, None] * sdym + n[None, :] * sdyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            packed = tl.load(QW + n[:, None] * sqn + (k_even // 2)[None, :], mask=w_mask, other=0)  # [BN, BK/2]
            scale = tl.load(SC + n[:, None] * ssn + g, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(ZP + n[:, None] * szn + g, mask=w_mask, other=0).to(tl.float32)
            else:
                zero = 8.0
            we, wo = _dequant_pair(packed, scale, zero, dy.dtype)
            acc_e += _dot(dy, we, DOT_MODE)
            acc_o += _dot(dy, wo, DOT_MODE)
        mask = m_ok[:, None] & k_ok[None, :]
        base = DX + m[:, None] * sdxm
        tl.store(base + k_even[None, :] * sdxk, acc_e.to(DX.dtype.element_ty), mask=mask)
        tl.store(base + (k_even + 1)[None, :] * sdxk, acc_o.to(DX.dtype.element_ty), mask=mask)


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


def gpu_config(m: int, dtype, backward: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA. Not timed yet (no GPU so far):
    the largest tiles that compile for sm_90 without register spills, with and without zero points
    (tests/kernels/test_compile_sm90.py checks that). fp32 takes the FMA path and needs small tiles."""
    if dtype == torch.float32:
        return (16, 32, 64, 4, 2) if backward else (16, 64, 64, 8, 2)
    if backward:
        return (16, 64, 128, 4, 2) if m <= 16 else (64, 64, 128, 8, 2)
    if m <= 16:  # GEMV / split-K: memory bound, M padded to the smallest tl.dot tile
        return 16, 64, 128, 4, 3
    return 128, 128, 64, 8, 3


def _forward_config(m, n, k, device, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for this launch."""
    if _interpreting():  # few, large blocks: interpreter time grows with programs x loop trips
        return (max(16, min(64, _next_pow2(m))), max(16, min(128, _next_pow2(n))), max(32, min(256, _next_pow2(k))),
                1, 4, 1)
    bm, bn, bk, nw, ns = gpu_config(m, dtype)
    split_k = 1
    if m <= 16:  # split K until the grid covers ~2 waves, keeping >= 2 K steps per split
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        split_k = max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, bn)), k // (2 * bk)))
    return bm, bn, bk, split_k, nw, ns


def _launch_forward(x2, qweight, scales, zeros, group_size, n, k, block_m=None, block_n=None, block_k=None, split_k=None,
                    num_warps=None, num_stages=None, out=None):
    m = x2.shape[0]
    if out is not None and (out.dtype != x2.dtype or out.numel() != m * n or not out.is_contiguous()):
        raise ValueError(f"int4_matmul: out must be a contiguous {x2.dtype} tensor of {m} x {n}")
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if out is None else out.view(m, n)
    if m == 0:
        return y
    bm, bn, bk, sk, nw, ns = _forward_config(m, n, k, x2.device, x2.dtype)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    sk, nw, ns = split_k or sk, num_warps or nw, num_stages or ns
    k_per_split = triton.cdiv(triton.cdiv(k, sk), bk) * bk  # whole K blocks per split
    sk = triton.cdiv(k, k_per_split)
    dest = y if sk == 1 else torch.empty(sk, m, n, dtype=torch.float32, device=x2.device)
    z = zeros if zeros is not None else scales
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), sk)
    _int4_mm_kernel[grid](
        x2, qweight, scales, z, dest, m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), z.stride(0), y.stride(0), y.stride(1),
        GROUP=group_size, HAS_ZEROS=zeros is not None, SPLIT_K=sk,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_MODE=_dot_mode(x2.dtype), num_warps=nw, num_stages=ns,
    )
    if sk > 1:
        y.copy_(dest.sum(0))
    return y


def _launch_dx(dy2, qweight, scales, zeros, group_size, n, k, block_m=None, block_n=None, block_k=None):
    m = dy2.shape[0]
    dx = torch.empty(m, k, dtype=dy2.dtype, device=dy2.device)
    if m == 0:
        return dx
    if _interpreting():
        bm, bn, bk, nw, ns = max(16, min(64, _next_pow2(m))), max(16, min(128, _next_pow2(n))), max(32, min(256, _next_pow2(k))), 4, 1
    else:
        bm, bn, bk, nw, ns = gpu_config(m, dy2.dtype, backward=True)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    z = zeros if zeros is not None else scales
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    _int4_mm_dx_kernel[grid](
        dy2, qweight, scales, z, dx, m, n, k,
        dy2.stride(0), dy2.stride(1), qweight.stride(0), scales.stride(0), z.stride(0), dx.stride(0), dx.stride(1),
        GROUP=group_size, HAS_ZEROS=zeros is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_MODE=_dot_mode(dy2.dtype), num_warps=nw, num_stages=ns,
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
