"""Quantize once: a float Decoder -> the packed format of qformat.py, by RTN (GPTQ and AWQ: see
the quantization issue; they produce the same codes/scales/zeros tensors)."""

from __future__ import annotations

import torch

from .errors import EdgeSLMError
from .qformat import fill_int4, int4_grid_rtn, int8_grid_rtn, linear_names, swap_modules


@torch.no_grad()
def quantize_model(model, scheme, calibration: torch.Tensor | None = None, progress: bool = True):
    """In place: float linears and embedding -> int4/int8 modules holding the scheme's grid."""
    if not scheme.quantized:
        return model.to(getattr(torch, scheme.float_dtype))
    if scheme.method not in ("rtn",):
        raise EdgeSLMError(f"{scheme.name}: the {scheme.method} quantizer is not available yet")
    floats = {name: model.get_submodule(name).weight.detach().float().clone() for name in linear_names(model)}
    embedding = model.embed_tokens.weight.detach().float().clone()
    swap_modules(model, scheme)
    for name, w in floats.items():
        _fill(model.get_submodule(name), w, scheme)
    _fill(model.embed_tokens, embedding, scheme)
    return model


def _fill(module, w, scheme):
    if scheme.bits == 4:
        fill_int4(module, *int4_grid_rtn(w, scheme.group_size, scheme.symmetric))
    else:
        q, s = int8_grid_rtn(w)
        module.qweight.copy_(q)
        module.scales.copy_(s)



