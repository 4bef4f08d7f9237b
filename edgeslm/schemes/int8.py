"""Int8 per output channel (q8c): modules, grid, and target encodings.

Layout: qweight int8 [N, K], scales fp16 [N], symmetric (W = q * s); the embedding int8 per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import QuantizedEmbedding, QuantizedLinear, Scheme, ShiftScale

GGML_BLOCK = 32  # weights per llama.cpp Q8_0 block


class Int8Linear(QuantizedLinear):
    def __init__(self, in_features, out_features, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype=torch.float32):
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x):
        return ops.linear(x, self.dequantized(x.dtype), self.bias)

    def ggml(self, rows=None):
        qweight, scales = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return q8_0(qweight, scales.reshape(qweight.shape[0], -1))

    def shift_scale(self):
        import numpy as np

        return ShiftScale(self.qweight.numpy(), self.scales.numpy().astype(np.float16)[:, None], None, uint4=False)


class Int8Embedding(Int8Linear, QuantizedEmbedding):
    def __init__(self, vocab, dim):
        super().__init__(dim, vocab, bias=False)

    def forward(self, ids):
        rows = self.qweight[ids.flatten()].float() * self.scales[ids.flatten()].float()[:, None]
        return rows.view(*ids.shape, -1)

    def project(self, h):
        return Int8Linear.forward(self, h)


def q8_0(qweight: torch.Tensor, scales: torch.Tensor):
    """int8 [N, K] with fp16 scales [N, B] (B blocks along K, B dividing K/32) -> llama.cpp Q8_0:
    blocks of 32 int8 with one fp16 scale each, exact for any B (each scale is repeated)."""
    import gguf
    import numpy as np

    codes = qweight.cpu().numpy()
    n, k = codes.shape
    d = np.repeat(scales.cpu().numpy().astype(np.float16), (k // GGML_BLOCK) // scales.shape[1], axis=1)
    d = d.reshape(n, k // GGML_BLOCK, 1).view(np.uint8)  # fp16 as 2 little-endian bytes
    qs = codes.reshape(n, k // GGML_BLOCK, GGML_BLOCK).view(np.uint8)
    return np.concatenate((d, qs), axis=-1).reshape(n, -1), gguf.GGMLQuantizationType.Q8_0


def int8_grid_rtn(w: torch.Tensor):
    scale = (w.float().abs().amax(-1) / 127).clamp_min(1e-10).half()
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Channels(Scheme):
    def describe(self) -> str:
        return "int8 per-channel linears (symmetric), int8 per-row embedding"

    def target_reason(self, target: str) -> str | None:
        if target in ("gguf", "coreml"):
            return None
        return f"{self.name}: int8 per output channel has no {target} mapping (gguf and coreml carry it)"

    def linear_module(self, in_features, out_features, bias):
        return Int8Linear(in_features, out_features, bias)

    def embedding_module(self, vocab, dim):
        return Int8Embedding(vocab, dim)

    def rtn_grid(self, w):
        return int8_grid_rtn(w.detach())

    def fill(self, module, grid):
        module.qweight.copy_(grid[0])
        module.scales.copy_(grid[1])

    def ggml_file_type(self) -> str:
        return "MOSTLY_Q8_0"


def schemes() -> list[Scheme]:
    return [Int8Channels("q8c", 8, None, True, "rtn")]
