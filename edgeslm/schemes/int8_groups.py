"""Int8 in groups of 32 along K (q8g32): modules, grid, and the targets that carry it exactly.

Layout: qweight int8 [N, K], scales fp16 [N, K/32], symmetric (W = q * s per group); the
embedding (and a tied lm_head with it) the same, per row. Finer than q8c's one scale per output
channel, and byte for byte llama.cpp's Q8_0. Carried by gguf (Q8_0), onnx (MatMulNBits and
GatherBlockQuantized with bits=8, codes offset by their default zero point 128) and coreml
(constexpr_blockwise_shift_scale); the other targets refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..errors import EdgeSLMError
from .base import NBits, QuantizedEmbedding, QuantizedLinear, Scheme, ShiftScale
from .int8 import Int8Channels, q8_0

GROUP = 32


class Int8GroupLinear(QuantizedLinear):
    def __init__(self, in_features, out_features, bias: bool):
        super().__init__()
        if in_features % GROUP:
            raise EdgeSLMError(f"group size {GROUP} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // GROUP, dtype=torch.float16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype=torch.float32):
        return _dequantize(self.qweight, self.scales).to(dtype)

    def forward(self, x):
        return ops.linear(x, self.dequantized(x.dtype), self.bias)

    def ggml(self, rows=None):
        qweight, scales = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return q8_0(qweight, scales)

    def nbits(self):
        n, k = self.qweight.shape
        codes = (self.qweight.to(torch.int16) + 128).to(torch.uint8)  # zero point 128: the ops' default
        return NBits(8, GROUP, codes.view(n, k // GROUP, GROUP), self.scales, None, None)

    def shift_scale(self):
        return ShiftScale(self.qweight.numpy(), self.scales.numpy(), None, uint4=False)


class Int8GroupEmbedding(Int8GroupLinear, QuantizedEmbedding):
    def __init__(self, vocab, dim):
        super().__init__(dim, vocab, bias=False)

    def forward(self, ids):
        rows = _dequantize(self.qweight[ids.flatten()], self.scales[ids.flatten()])
        return rows.view(*ids.shape, -1)

    def project(self, h):
        return Int8GroupLinear.forward(self, h)


def _dequantize(qweight, scales):
    n, k = qweight.shape
    return (qweight.float().view(n, k // GROUP, GROUP) * scales.float()[..., None]).view(n, k)


@dataclass(frozen=True)
class Int8Groups(Int8Channels):  # fill and the GGUF file type are q8c's
    def describe(self) -> str:
        return f"int8 symmetric group-{GROUP} linears and embedding by RTN; norms and biases float"

    def target_reason(self, target: str) -> str | None:
        if target in ("gguf", "onnx", "coreml"):
            return None
        return f"{self.name}: int8 in groups has no {target} lowering (gguf, onnx and coreml carry it)"

    def linear_module(self, in_features, out_features, bias):
        return Int8GroupLinear(in_features, out_features, bias)

    def embedding_module(self, vocab, dim):
        return Int8GroupEmbedding(vocab, dim)

    def rtn_grid(self, w):
        return int8_group_grid_rtn(w)


def int8_group_grid_rtn(w: torch.Tensor):
    """Float [N, K] -> (int8 codes [N, K], fp16 scales [N, K/32]) by round-to-nearest, s = max|w| / 127."""
    n, k = w.shape
    g = w.detach().float().view(n, k // GROUP, GROUP)
    scales = (g.abs().amax(-1) / 127).clamp_min(2**-24).half()
    q = torch.round(g / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scales


def schemes() -> list[Scheme]:
    return [Int8Groups("q8g32", 8, GROUP, True, "rtn")]
