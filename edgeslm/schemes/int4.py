"""Int4 in groups of G along K (q4g{G}[a]-{rtn,gptq,awq}): modules, grids, and target encodings.

Layout (kernels/int4_matmul.py documents the packing): qweight uint8 [N, K/2], two codes per
byte, low nibble first; scales fp16 [N, K/G]; zeros uint8 [N, K/G] for asymmetric groups, else the
implicit zero 8. Every target maps these tensors as they are, none re-quantizes from float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..errors import EdgeSLMError
from ..kernels.int4_matmul import dequantize_int4, pack_int4, unpack_int4
from .base import NBits, QuantizedEmbedding, QuantizedLinear, Scheme, ShiftScale

GGML_BLOCK = 32  # weights per llama.cpp Q4_0 block


class Int4Linear(QuantizedLinear):
    def __init__(self, in_features, out_features, group_size, symmetric, bias: bool):
        super().__init__()
        if in_features % group_size:
            raise EdgeSLMError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype=torch.float32):
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x):
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def ggml(self, rows=None):
        """Q4_0: blocks of 32 codes with one fp16 scale and the implicit zero 8, which is our
        symmetric layout with each group's scale repeated over its 32-blocks."""
        import gguf
        import numpy as np

        if self.zeros is not None or self.group_size % GGML_BLOCK:
            raise EdgeSLMError("Q4_0 holds symmetric int4 in groups of a multiple of 32 only")
        qweight, scales = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        codes = unpack_int4(qweight.cpu()).numpy()  # [N, K], 0..15
        n, k = codes.shape
        blocks = codes.reshape(n, k // GGML_BLOCK, 2, GGML_BLOCK // 2)
        qs = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)  # byte j: element j low, j + 16 high
        d = np.repeat(scales.cpu().numpy().astype(np.float16), self.group_size // GGML_BLOCK, axis=1)
        d = d.reshape(n, k // GGML_BLOCK, 1).view(np.uint8)  # fp16 as 2 little-endian bytes
        data = np.concatenate((d, qs.astype(np.uint8)), axis=-1).reshape(n, -1)
        return data, gguf.GGMLQuantizationType.Q4_0

    def nbits(self):
        n, k, g = self.out_features, self.in_features, self.group_size
        zp = block_zp = None
        if self.zeros is not None:
            zp = pack_zero_points(self.zeros)
            block_zp = self.zeros.reshape(n, k // g, 1)
        return NBits(4, g, self.qweight.reshape(n, k // g, g // 2), self.scales, zp, block_zp)

    def shift_scale(self):
        import numpy as np

        scale = self.scales.detach().numpy().astype(np.float16)
        codes = unpack_int4(self.qweight).numpy()
        zeros = self.zeros.numpy() if self.zeros is not None else np.full(scale.shape, 8, np.uint8)
        return ShiftScale(codes, scale, zeros, uint4=True)


class Int4Embedding(Int4Linear, QuantizedEmbedding):
    """An int4 table [V, H]; forward gathers rows, project is the tied lm_head over the same codes."""

    def __init__(self, vocab, dim, group_size, symmetric):
        super().__init__(dim, vocab, group_size, symmetric, bias=False)

    def forward(self, ids):
        z = None if self.zeros is None else self.zeros[ids.flatten()]
        rows = dequantize_int4(self.qweight[ids.flatten()], self.scales[ids.flatten()], z, self.group_size)
        return rows.view(*ids.shape, -1)

    def project(self, h):
        return ops.int4_linear(h, self.qweight, self.scales, self.zeros, self.group_size)


def pack_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """uint8 [N, G] (0..15) -> uint8 [N, ceil(G/2)], two per byte, low nibble first (MatMulNBits)."""
    n, groups = zeros.shape
    if groups % 2:
        zeros = torch.cat((zeros, torch.zeros(n, 1, dtype=torch.uint8)), dim=1)
    return zeros[:, 0::2] | (zeros[:, 1::2] << 4)


# ---------------------------------------------------------------- round-to-nearest grids


def scale_grid(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp16 values that bf16 holds exactly too (8 significant bits).

    XNNPACK (the ExecuTorch target) stores blockwise int4 scales as bf16, every other runtime as
    fp16 or wider: on this grid all of them multiply the codes by the same numbers, so the int4
    weights are bit-identical everywhere. (A bf16 value under 2**-17 may round once more to an
    fp16 subnormal, which then has at most 8 significant bits: still exact in bf16.) An all-zero
    group gets the smallest fp16 scale, not 0, which XNNPACK rejects at load."""
    return scale.float().to(torch.bfloat16).to(torch.float16).clamp_min(2**-24)


def int4_grid_rtn(w: torch.Tensor, group_size: int, symmetric: bool):
    """Float [N, K] -> (codes uint8 [N, K], scales fp16 [N, K/G], zeros uint8 [N, K/G] | None).

    Symmetric: codes = round(w / s) + 8 with s = max|w| / 7.5 over the group, so both ends of the
    -8..7 range are used. Asymmetric: s = (max - min) / 15 and an integer zero point.
    """
    n, k = w.shape
    if k % group_size:
        raise EdgeSLMError(f"group size {group_size} does not divide K = {k}")
    g = w.float().view(n, k // group_size, group_size)
    if symmetric:
        scale = scale_grid(g.abs().amax(-1) / 7.5)
        codes = torch.round(g / scale.float()[..., None]).clamp(-8, 7) + 8
        zeros = None
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scale = scale_grid((hi - lo) / 15)
        zeros = torch.round(-lo / scale.float()).clamp(0, 15)
        codes = torch.round(g / scale.float()[..., None] + zeros[..., None]).clamp(0, 15)
        zeros = zeros.to(torch.uint8)
    return codes.view(n, k).to(torch.uint8), scale, zeros


def fill_int4(module: Int4Linear, codes, scales, zeros):
    module.qweight.copy_(pack_int4(codes))
    module.scales.copy_(scales)
    if module.zeros is not None:
        module.zeros.copy_(zeros)


# ---------------------------------------------------------------- the scheme


@dataclass(frozen=True)
class Int4Groups(Scheme):
    def describe(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        emb = {"rtn": "RTN", "gptq": "GPTQ on the final hidden states"}.get(
            self.method, "RTN with an output-weighted scale search")
        return (f"int4 {sym} group-{self.group_size} linears by {self.method.upper()}, "
                f"int4 group-{self.group_size} embedding by {emb}; norms and biases float")

    def target_reason(self, target: str) -> str | None:
        g = self.group_size
        if target == "onnx" and (g < 16 or g & (g - 1)):
            return f"{self.name}: MatMulNBits needs a power-of-2 block size >= 16"
        if target == "gguf" and not self.symmetric:
            return (f"{self.name}: asymmetric int4 has no exact GGUF type (Q4_1 rounds -zero*scale to fp16); "
                    "use a symmetric scheme (q4g32-*) for GGUF")
        if target == "executorch" and not self.symmetric:
            return (f"the executorch target maps symmetric int4 (XNNPACK's 4-bit blockwise kernels have no zero "
                    f"points) and f32; not {self.name}")
        return None

    def linear_module(self, in_features, out_features, bias):
        return Int4Linear(in_features, out_features, self.group_size, self.symmetric, bias)

    def embedding_module(self, vocab, dim):
        return Int4Embedding(vocab, dim, self.group_size, self.symmetric)

    def rtn_grid(self, w):
        return int4_grid_rtn(w.detach(), self.group_size, self.symmetric)

    def fill(self, module, grid):
        fill_int4(module, *grid)

    def ggml_file_type(self) -> str:
        return "MOSTLY_Q4_0"


def schemes() -> list[Scheme]:
    return [Int4Groups(f"q4g{g}{suffix}-{method}", 4, g, sym, method)
            for g in (32, 64, 128) for method in ("rtn", "gptq", "awq") for sym, suffix in ((True, ""), (False, "a"))]
