"""The one table of quantization schemes. Every verb and every target looks schemes up here.

A name says everything that is quantized and how:
  f32 / f16           nothing quantized; weights in that float type
  q8c                 every decoder linear int8 per output channel (symmetric, fp16 scale);
                      the embedding (and a tied lm_head with it) int8 per row
  q4g{G}-{method}     every decoder linear int4, groups of G along K, symmetric (zero 8);
                      the embedding (and a tied lm_head with it) int4 g{G}: round-to-nearest for
                      rtn; for gptq GPTQ with the final normed hidden states' Hessian (what the tied
                      lm_head multiplies), the row lookups reading the same codes; for awq
                      round-to-nearest codes whose per-group scale is searched with that Hessian;
                      an untied lm_head int4 by the same method as the linears
  q4g{G}a-{method}    the same with asymmetric groups (an integer zero point per group)
  q8g32               every decoder linear and the embedding int8 in groups of 32 along K
  q4g32e8-gptq        the linears of q4g32-gptq; the embedding (and a tied lm_head with it) int8
                      in groups of 32 by round-to-nearest (llama.cpp's Q4_0 layout)
Norms, biases and RoPE tables always stay float (they are a few KB).

Each kind of weights is one module of this package (see base.py for what a scheme provides).
SCHEME_MODULES maps each to the names its schemes() returns: the table itself is built on first
use, so that listing names (the CLI's --help) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import EdgeSLMError

if TYPE_CHECKING:
    from .base import Scheme

SCHEME_MODULES = {
    "floating": "f32, f16",
    "int8": "q8c",
    "int4": "q4g{32,64,128}[a]-{rtn,gptq,awq}",
    "int8_groups": "q8g32",
    "int4_int8_table": "q4g32e8-gptq",
}
KNOWN = ", ".join(SCHEME_MODULES.values())
_TABLE: dict[str, Scheme] = {}


def all_schemes() -> dict[str, Scheme]:
    """name -> Scheme, every module's schemes() in SCHEME_MODULES order."""
    if not _TABLE:
        for module in SCHEME_MODULES:
            _TABLE.update({s.name: s for s in importlib.import_module(f"{__name__}.{module}").schemes()})
    return _TABLE


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
        return all_schemes()[name]
    except KeyError:
        raise EdgeSLMError(f"unknown scheme {name!r}; known: {KNOWN}") from None
