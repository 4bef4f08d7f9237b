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

# Calibration of GPTQ / AWQ: 32 windows x 512 tokens (16,384 tokens). On SmolLM2-135M q4g32-gptq
# it gave 2.0 to 3.6 points less perplexity loss than 8 windows (benchmarks/quality_levers.py, 3
# seeds) for a few more CPU minutes once per machine (the reference is cached); the published
# GPTQ/AWQ recipes use 128 x 2048 on a GPU, hours on 2 cores. --samples changes it.
DEFAULT_CALIBRATION = "brown:train"
CALIBRATION_SAMPLES = 32
CALIBRATION_LENGTH = 512


def get_scheme(name: str) -> Scheme:
    try:
        return all_schemes()[name]
    except KeyError:
        raise EdgeSLMError(f"unknown scheme {name!r}; known: {KNOWN}") from None
