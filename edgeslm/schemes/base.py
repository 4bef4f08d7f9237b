"""What a quantization scheme is: the Scheme object, and the module interface its targets lower.

A scheme file (int4.py, int8.py, ...) holds everything about one kind of weights: its modules,
how float weights become its grid, and one hook per target that can carry it. Targets never
branch on bit widths or module classes: they ask the scheme (`target_reason`) whether it can be
carried, and ask each quantized module for its encoding in the target's format (`ggml`, `nbits`,
`shift_scale`). A scheme without a hook for a target is refused by that target, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import EdgeSLMError


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int | None = None  # None: float
    group_size: int | None = None  # along K; None for per-channel or float
    symmetric: bool = True
    method: str = "none"  # "none" | "rtn" | "gptq" | "awq"
    float_dtype: str = "float32"  # dtype of what stays float (and of the whole model for f16)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    def describe(self) -> str:
        raise NotImplementedError

    def target_reason(self, target: str) -> str | None:
        """Why `target` cannot carry this scheme's weights exactly; None when it can. Float weights
        go everywhere; a quantized scheme names the targets it has hooks for."""
        return None if not self.quantized else f"{self.name} has no {target} lowering"

    def check_shapes(self, model) -> None:
        """Raises EdgeSLMError when the model's shapes do not fit the scheme (before any work): a
        group size that does not divide the K of some linear or the embedding width."""
        from ..model import linear_names

        g = self.group_size
        if g is None:
            return
        for name in linear_names(model):
            k = model.get_submodule(name).in_features
            if k % g:
                raise EdgeSLMError(f"{self.name}: group size {g} does not divide K = {k} of {name}")
        dim = model.embed_tokens.weight.shape[1]
        if dim % g:
            raise EdgeSLMError(f"{self.name}: group size {g} does not divide the embedding width {dim}")

    # ------------------------------------------------------------ quantizing

    def linear_module(self, in_features: int, out_features: int, bias: bool) -> "QuantizedLinear":
        raise EdgeSLMError(f"{self.name} quantizes nothing")

    def embedding_module(self, vocab: int, dim: int) -> "QuantizedEmbedding":
        raise EdgeSLMError(f"{self.name} quantizes nothing")

    def rtn_grid(self, w: torch.Tensor) -> tuple:
        """Round-to-nearest grid of a float weight [N, K], in the form `fill` takes."""
        raise EdgeSLMError(f"{self.name} quantizes nothing")

    def fill(self, module: "QuantizedLinear", grid: tuple) -> None:
        raise EdgeSLMError(f"{self.name} quantizes nothing")

    def table_grid(self, w: torch.Tensor) -> tuple | None:
        """The embedding table's grid when the scheme gives the table its own format (in the form
        `fill` takes for embedding_module's module); None: the quantizer's method quantizes it."""
        return None

    def ggml_file_type(self) -> str:
        """The GGUF general.file_type name (gguf.LlamaFileType) of an artifact in this scheme."""
        return "MOSTLY_F16" if self.float_dtype == "float16" else "ALL_F32"


class NBits(NamedTuple):
    """A weight in onnxruntime's MatMulNBits / GatherBlockQuantized layout."""

    bits: int
    block_size: int
    blob: torch.Tensor  # uint8 [N, K/block, block*bits/8]
    scales: torch.Tensor  # fp16 [N, K/block]
    zero_points: torch.Tensor | None  # uint8, MatMulNBits' packing; None: the op's default zero point
    block_zero_points: torch.Tensor | None  # uint8 [N, K/block, 1], GatherBlockQuantized's form


class ShiftScale(NamedTuple):
    """A weight as Core ML's constexpr_blockwise_shift_scale takes it: (data - offset) * scale."""

    data: object  # numpy codes [N, K]
    scale: object  # numpy fp16 [N, K/block] (a block may span the whole row)
    offset: object | None  # numpy codes [N, K/block] or None
    uint4: bool  # data and offset are 4-bit codes (coremltools' uint4 dtype)


class QuantizedLinear(nn.Module):
    """The interface every scheme's linear module offers: forward, the exact float weight, and one
    encoding hook per target format. A hook the scheme lacks raises EdgeSLMError."""

    in_features: int
    out_features: int

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def ggml(self, rows: torch.Tensor | None = None):
        """(numpy blocks, gguf.GGMLQuantizationType) of the weight, rows reordered by `rows`."""
        raise EdgeSLMError(f"{type(self).__name__} has no GGUF encoding")

    def nbits(self) -> NBits:
        raise EdgeSLMError(f"{type(self).__name__} has no MatMulNBits encoding")

    def shift_scale(self) -> ShiftScale:
        raise EdgeSLMError(f"{type(self).__name__} has no Core ML blockwise encoding")


class QuantizedEmbedding(QuantizedLinear):
    """A quantized table [V, H]: forward gathers rows, `project` is the tied lm_head over it."""

    def project(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
