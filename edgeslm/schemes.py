"""The one table of quantization schemes. Every verb and every target looks schemes up here.

A name says everything that is quantized and how:
  f32 / f16           nothing quantized; weights in that float type
  q8c                 every decoder linear int8 per output channel (symmetric, fp16 scale);
                      the embedding (and a tied lm_head with it) int8 per row
  q4g{G}-{method}     every decoder linear int4, groups of G along K, symmetric (zero 8);
                      the embedding (and a tied lm_head with it) int4 g{G}: round-to-nearest for
                      rtn; for gptq/awq round-to-nearest codes whose per-group range is chosen by
                      a clip search weighted by the final hidden states (what the tied lm_head
                      multiplies), which keeps row lookups plain RTN codes;
                      an untied lm_head int4 by the same method as the linears
  q4g{G}a-{method}    the same with asymmetric groups (an integer zero point per group)
Norms, biases and RoPE tables always stay float (they are a few KB).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgeSLMError


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int | None  # None: float
    group_size: int | None  # int4 only; int8 is per channel
    symmetric: bool
    method: str  # "none" | "rtn" | "gptq" | "awq"
    float_dtype: str = "float32"  # dtype of what stays float (and of the whole model for f16)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    def describe(self) -> str:
        if not self.quantized:
            return f"no quantization, {self.float_dtype} weights"
        if self.bits == 8:
            return "int8 per-channel linears (symmetric), int8 per-row embedding"
        sym = "symmetric" if self.symmetric else "asymmetric"
        emb = "RTN" if self.method == "rtn" else "RTN with an output-weighted clip search"
        return (f"int4 {sym} group-{self.group_size} linears by {self.method.upper()}, "
                f"int4 group-{self.group_size} embedding by {emb}; norms and biases float")


def _build() -> dict[str, Scheme]:
    table = {
        "f32": Scheme("f32", None, None, True, "none", "float32"),
        "f16": Scheme("f16", None, None, True, "none", "float16"),
        "q8c": Scheme("q8c", 8, None, True, "rtn"),
    }
    for g in (32, 64, 128):
        for method in ("rtn", "gptq", "awq"):
            for sym, suffix in ((True, ""), (False, "a")):
                name = f"q4g{g}{suffix}-{method}"
                table[name] = Scheme(name, 4, g, sym, method)
    return table


SCHEMES: dict[str, Scheme] = _build()
DEFAULT_SCHEME = "q4g32-gptq"

# Calibration of GPTQ / AWQ. 8 windows x 512 tokens (4,096 tokens): GPTQ over SmolLM2-135M's 30
# layers costs about three CPU minutes (two forward passes per layer dominate); the published
# GPTQ/AWQ recipes use 128 x 2048 on a GPU, which on this 2-core machine would take hours.
# --samples raises it.
DEFAULT_CALIBRATION = "brown:train"
CALIBRATION_SAMPLES = 8
CALIBRATION_LENGTH = 512


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise EdgeSLMError(
            f"unknown scheme {name!r}; known: f32, f16, q8c, q4g{{32,64,128}}[a]-{{rtn,gptq,awq}}"
        ) from None
