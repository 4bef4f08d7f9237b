"""The reference decoder's layers as tvm.relax.frontend.nn modules, for the WebGPU build
(webllm_model.py assembles them around the paged KV cache).

Same families and switches as edgeslm/model.py (DecoderSpec): sandwich norms, qk-norm, partial
rotary, gelu_tanh, biases, tied embeddings. Weights are the packed tensors of the schemes, mapped
without re-quantizing (`export_params`):

  int4 linear   qweight uint8 [N, K/2] -> uint32 [N, K/8], the same bytes read as little-endian
                words (WGSL has no 8-bit storage), so nibble j of word i is k = 8i + j;
                scales fp16 -> compute dtype (exact for f32); zeros uint8 -> compute dtype (exact)
  float linear  weight [N, K] in the compute dtype
  rope tables   cos/sin [context, rotary_dim] in f32, computed by the reference's own code
"""

from __future__ import annotations

import numpy as np
import torch
from tvm import te
from tvm import tirx as tir
from tvm.relax.frontend import nn

from edgeslm.config import DecoderSpec
from edgeslm.errors import EdgeSLMError

COMPUTE_DTYPES = ("float32", "float16")


class QuantLinear(nn.Module):
    """int4 group-wise linear (symmetric zero 8, or a float zero point per group)."""

    def __init__(self, k: int, n: int, group: int, symmetric: bool, bias: bool, dtype: str):
        if k % 8 or k % group:
            raise EdgeSLMError(f"int4 linear with K={k} needs K divisible by 8 and by the group size {group}")
        self.k, self.n, self.group, self.dtype = k, n, group, dtype
        self.qweight = nn.Parameter((n, k // 8), "uint32")
        self.scales = nn.Parameter((n, k // group), dtype)
        self.zeros = None if symmetric else nn.Parameter((n, k // group), dtype)
        self.bias = nn.Parameter((n,), dtype) if bias else None

    def weight_value(self, q, s, z, n, k):
        """Dequantized W[n, k] as a TE expression (codes - zero) * scale."""
        code = (q[n, k // 8] >> (tir.Cast("uint32", k % 8) * tir.const(4, "uint32"))) & tir.const(15, "uint32")
        zero = tir.const(8.0, self.dtype) if z is None else z[n, k // self.group]
        return (tir.Cast(self.dtype, code) - zero) * s[n, k // self.group]

    def forward(self, x):
        args = [x, self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])

        def compute(x, q, s, z=None):
            *lead, k = x.shape
            w = te.compute((self.n, self.k), lambda n, kk: self.weight_value(q, s, z, n, kk), name="dequantize")
            r = te.reduce_axis((0, self.k), name="k")
            return te.compute(
                (*lead, self.n),
                lambda *idx: te.sum(x[(*idx[:-1], r)] * w[idx[-1], r], axis=r),
                name="int4_matmul",
            )

        y = nn.op.tensor_expr_op(compute, "int4_linear", args)
        return y if self.bias is None else y + self.bias

    def gather(self, ids):
        """Rows of the table (the int4 embedding): ids [T] -> [T, K]."""
        args = [ids, self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])

        def compute(ids, q, s, z=None):
            return te.compute((ids.shape[0], self.k), lambda t, kk: self.weight_value(q, s, z, ids[t], kk), name="gather")

        return nn.op.tensor_expr_op(compute, "int4_embedding", args)


class FloatLinear(nn.Module):
    def __init__(self, k: int, n: int, bias: bool, dtype: str):
        self.weight = nn.Parameter((n, k), dtype)
        self.bias = nn.Parameter((n,), dtype) if bias else None

    def forward(self, x):
        y = nn.op.matmul(x, nn.op.permute_dims(self.weight))
        return y if self.bias is None else y + self.bias

    def gather(self, ids):
        return nn.op.take(self.weight, ids, axis=0)


class Norm(nn.Module):
    """RMSNorm (Llama), Gemma's (1 + w) RMSNorm or LayerNorm; statistics in f32 like the reference."""

    def __init__(self, kind: str, dim: int, eps: float, dtype: str):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.weight = nn.Parameter((dim,), dtype)
        self.bias = nn.Parameter((dim,), dtype) if kind == "layer" else None

    def forward(self, x):
        if self.kind == "layer":
            return nn.op.layer_norm(x, [x.shape[-1]], self.weight, self.bias, eps=self.eps)
        x32 = x.astype("float32")
        dim = x.shape[-1]
        ms = nn.op.sum(x32 * x32, axis=-1, keepdims=True) / float(dim)
        y = x32 / nn.op.sqrt(ms + self.eps)
        if self.kind == "rms_gemma":
            return (y * (self.weight.astype("float32") + 1.0)).astype(self.dtype)
        return y.astype(self.dtype) * self.weight


def make_linear(k, n, bias, quant, dtype):
    if quant is None:
        return FloatLinear(k, n, bias, dtype)
    return QuantLinear(k, n, quant["group_size"], quant["symmetric"], bias, dtype)


def rope(x, cos, sin, rotary_dim):
    """x [T, H, D]; cos/sin [T, rotary_dim] -> rotated first rotary_dim dims (HF convention)."""
    half = rotary_dim // 2

    def compute(x, c, s):
        def cell(t, h, d):
            rotated = tir.Select(d < half, -x[t, h, tir.min(d + half, rotary_dim - 1)], x[t, h, tir.max(d - half, 0)])
            inside = x[t, h, d] * c[t, tir.min(d, rotary_dim - 1)] + rotated * s[t, tir.min(d, rotary_dim - 1)]
            return tir.Select(d < rotary_dim, inside, x[t, h, d])

        return te.compute(x.shape, cell, name="rope")

    return nn.op.tensor_expr_op(compute, "rope", [x, cos, sin])


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, quant, dtype):
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = make_linear(h, i, spec.mlp_bias, quant, dtype)
        self.up_proj = make_linear(h, i, spec.mlp_bias, quant, dtype)
        self.down_proj = make_linear(i, h, spec.mlp_bias, quant, dtype)
        self.act = spec.act

    def forward(self, x):
        g = self.gate_proj(x)
        g = nn.op.silu(g) if self.act == "silu" else nn.op.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


def export_params(decoder, relax_names: list[str], dtype: str, context: int = 512) -> dict[str, np.ndarray]:
    """Our Decoder's tensors under the Relax module's parameter names, in the layouts above."""
    state = {k: v for k, v in decoder.state_dict().items()}
    for key in decoder.rope_scaling:
        cos, sin = decoder.rope(key, torch.arange(context), torch.float32)
        state[f"rope_cos_{key}"], state[f"rope_sin_{key}"] = cos, sin
    out = {}
    np_dtype = np.float16 if dtype == "float16" else np.float32
    for name in relax_names:
        if name not in state:
            raise EdgeSLMError(f"webgpu export: the model has no tensor {name!r}")
        t = state[name].detach().cpu().contiguous()
        if name.endswith("qweight"):
            if t.dtype != torch.uint8:
                raise EdgeSLMError(f"webgpu export: {name} is {t.dtype}; only int4 (uint8-packed) weights map to WGSL")
            out[name] = t.numpy().view("<u4")  # the same bytes, four at a time
        elif name.startswith("rope_"):  # tables stay f32: the shader casts after the lookup
            out[name] = t.float().numpy()
        else:
            out[name] = t.float().numpy().astype(np_dtype)
    return out
