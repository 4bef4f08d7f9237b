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

The Triton kernels are added by the kernels issue; the reference below is what the decoder uses
off CUDA and what export traces.
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
