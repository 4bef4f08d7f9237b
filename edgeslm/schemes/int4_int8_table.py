"""Int4 linears with an int8 table (q4g32e8-gptq): the linears of q4g32-gptq, the embedding table
(and a tied lm_head with it) int8 in groups of 32 (q8g32's layout, round-to-nearest).

The tied table is the one matrix that both ends of the model read, and on a small model it is a
large share of the parameters: int8 there costs about 0.09 bytes per parameter more than q4g32-gptq
on SmolLM2-135M and removes a large part of its perplexity loss (benchmarks/quality.py). It is
llama.cpp's own Q4_0 layout: Q4_0 linears, a Q8_0 token_embd / output. An untied lm_head is a
linear like the others (int4 by GPTQ). Carried by gguf (Q4_0 and Q8_0), onnx (MatMulNBits with
bits 4, GatherBlockQuantized and the tied MatMulNBits with bits 8) and coreml (blockwise
shift-scale, uint4 and int8); executorch and webgpu map one int4 grid for every weight and refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Scheme
from .int4 import Int4Groups, fill_int4
from .int8_groups import GROUP, Int8GroupEmbedding, Int8GroupLinear, int8_group_grid_rtn


@dataclass(frozen=True)
class Int4Int8Table(Int4Groups):  # linears, their grids and GGUF file type (MOSTLY_Q4_0) are int4's
    def describe(self) -> str:
        return (f"int4 symmetric group-{self.group_size} linears by {self.method.upper()}, int8 group-{GROUP} "
                "embedding (and tied lm_head) by RTN; norms and biases float")

    def target_reason(self, target: str) -> str | None:
        if target in ("gguf", "onnx", "coreml"):
            return None
        return f"{self.name}: int4 linears with an int8 table have no {target} lowering (gguf, onnx and coreml carry it)"

    def embedding_module(self, vocab, dim):
        return Int8GroupEmbedding(vocab, dim)

    def table_grid(self, w):
        return int8_group_grid_rtn(w)

    def fill(self, module, grid):
        if isinstance(module, Int8GroupLinear):  # the table
            module.qweight.copy_(grid[0])
            module.scales.copy_(grid[1])
        else:
            fill_int4(module, *grid)


def schemes() -> list[Scheme]:
    return [Int4Int8Table("q4g32e8-gptq", 4, 32, True, "gptq")]
