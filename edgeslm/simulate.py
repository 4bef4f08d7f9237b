"""The reference decoder with a runtime's arithmetic: what verify's inexact bounds are derived from.

A runtime that rounds activations to 8 bits (llama.cpp's Q8_0 blocks, XNNPACK's per-row int8) or
keeps its KV cache in fp16 does not compute the reference's function exactly. Rather than a bound
picked by hand, a target simulates that arithmetic here on the reference itself, and
parity.derive_bounds measures how far the simulation lands from the reference on verify's own
prompt: the artifact must then land about as close, which a swapped row or a wrong scale does not.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class RoundedCache(nn.Module):
    """Wraps a layer's KVAttention so that keys and values are rounded to `dtype` (the cache's)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, q, k, v, *rest):
        return self.inner(q, k.to(self.dtype).to(k.dtype), v.to(self.dtype).to(v.dtype), *rest)


def q8_0(x: torch.Tensor, block: int = 32, fp16_scale: bool = True) -> torch.Tensor:
    """llama.cpp's Q8_0 round trip along the last dimension: per block of 32, an fp16 scale
    d = max|x| / 127 and codes round(x / d). With fp16_scale False, d stays fp32: onnxruntime's
    MatMulNBits at accuracy_level 4 (per block of the weights' block size)."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    d = d.half().float() if fp16_scale else d
    codes = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0)
    return (codes * d).reshape(shape).to(x.dtype)


def fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


@contextlib.contextmanager
def simulated(model, activations=None, cache_dtype: torch.dtype | None = None,
              compute_dtype: torch.dtype | None = None):
    """Yields `model` computing as a runtime does: every linear layer's input rounded with
    `activations` (the tied lm_head's too), the KV cache kept in `cache_dtype`. With
    `compute_dtype`, it yields a copy of the model in that dtype instead (fp16 compute: every
    product, norm input and activation rounded), and `model` is left as it was. All restored on exit."""
    from .schemes.base import QuantizedEmbedding, QuantizedLinear
    from .model import Linear

    if compute_dtype is not None:
        import copy

        model = copy.deepcopy(model).to(compute_dtype)
    hooks, patched, swapped = [], [], []
    try:
        if activations is not None:
            for m in model.modules():
                if isinstance(m, (QuantizedLinear, Linear)) and not isinstance(m, QuantizedEmbedding):
                    hooks.append(m.register_forward_pre_hook(lambda mod, args: (activations(args[0]), *args[1:])))
            if model.lm_head is None:  # the tied lm_head multiplies the embedding table
                table = model.embed_tokens
                table.project = lambda h, original=table.project: original(activations(h))
                patched.append(table)
        if cache_dtype is not None:
            for layer in model.layers:
                swapped.append(layer.self_attn.kv_attention)
            model.swap_kv_attention(lambda i, kv: RoundedCache(kv, cache_dtype))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for m in patched:
            del m.project  # the instance attribute; the class method shows again
        if swapped:
            model.swap_kv_attention(lambda i, kv: swapped[i])
