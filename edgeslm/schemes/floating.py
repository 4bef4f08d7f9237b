"""Float weights (f32, f16): nothing quantized; every target carries them."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Scheme


@dataclass(frozen=True)
class FloatWeights(Scheme):
    def describe(self) -> str:
        return f"no quantization, {self.float_dtype} weights"


def schemes() -> list[Scheme]:
    return [FloatWeights("f32", float_dtype="float32"), FloatWeights("f16", float_dtype="float16")]
