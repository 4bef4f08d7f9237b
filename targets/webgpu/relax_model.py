"""The reference decoder written as a tvm.relax.frontend.nn module, for the WebGPU build.

Same families and switches as edgeslm/model.py (DecoderSpec): soft-caps, sliding windows, sandwich
norms, qk-norm, partial rotary, gelu_tanh, biases, tied embeddings, embed scale. Weights are the
packed tensors of qformat.py, mapped without re-quantizing (weights.py-style mapping in
`export_params`):

  int4 linear   qweight uint8 [N, K/2] -> uint32 [N, K/8], the same bytes read as little-endian
                words (WGSL has no 8-bit storage), so nibble j of word i is k = 8i + j;
                scales fp16 -> compute dtype (exact for f32); zeros uint8 -> compute dtype (exact)
  float linear  weight [N, K] in the compute dtype

The KV cache is a tuple of one tensor [2, kv_heads, past, head_dim] per layer, passed in and
returned grown by the new tokens (the "static cache" route of the issue: no paged cache, no runtime state), so
`forward(tokens, cache)` serves prefill (T > 1) and decode (T == 1) alike, and
`forward_first(tokens)` starts from an empty cache. Local layers keep every position and apply
the window by position in the mask: the same function the reference's ring buffer computes.
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


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, quant, dtype: str):
        h, d = spec.hidden_size, spec.head_dim
        self.spec, self.dtype = spec, dtype
        self.window = spec.sliding_window if spec.layer_is_local[layer] else None
        self.q_proj = make_linear(h, spec.num_heads * d, spec.qkv_bias, quant, dtype)
        self.k_proj = make_linear(h, spec.num_kv_heads * d, spec.qkv_bias, quant, dtype)
        self.v_proj = make_linear(h, spec.num_kv_heads * d, spec.qkv_bias, quant, dtype)
        self.o_proj = make_linear(spec.num_heads * d, h, spec.o_bias, quant, dtype)
        if spec.qk_norm:
            self.q_norm = Norm(spec.norm, d, spec.norm_eps, dtype)
            self.k_norm = Norm(spec.norm, d, spec.norm_eps, dtype)

    def forward(self, x, cos, sin, past_k, past_v):
        s = self.spec
        t = x.shape[1]
        q = nn.op.reshape(self.q_proj(x), (t, s.num_heads, s.head_dim))
        k = nn.op.reshape(self.k_proj(x), (t, s.num_kv_heads, s.head_dim))
        v = nn.op.reshape(self.v_proj(x), (t, s.num_kv_heads, s.head_dim))
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = nn.op.permute_dims(rope(q, cos, sin, s.rotary_dim), (1, 0, 2))  # [H, T, D]
        k = nn.op.permute_dims(rope(k, cos, sin, s.rotary_dim), (1, 0, 2))  # [Hkv, T, D]
        v = nn.op.permute_dims(v, (1, 0, 2))
        if past_k is not None:
            k = nn.op.concat([past_k, k], dim=1)  # [Hkv, S, D]
            v = nn.op.concat([past_v, v], dim=1)
        rep = s.num_heads // s.num_kv_heads
        kk = nn.op.repeat(k, rep, axis=0) if rep > 1 else k
        vv = nn.op.repeat(v, rep, axis=0) if rep > 1 else v
        scores = nn.op.matmul(q.astype("float32"), nn.op.permute_dims(kk.astype("float32"), (0, 2, 1)))
        scores = scores * s.attn_scale
        if s.attn_softcap is not None:
            scores = nn.op.tanh(scores / s.attn_softcap) * s.attn_softcap
        probs = nn.op.softmax(causal_mask(scores, self.window), axis=-1).astype(self.dtype)
        out = nn.op.matmul(probs, vv)  # [H, T, D]
        out = nn.op.reshape(nn.op.permute_dims(out, (1, 0, 2)), (1, t, s.num_heads * s.head_dim))
        return self.o_proj(out), k, v


def causal_mask(scores, window):
    """scores [H, T, S] (the last T of S positions are new) -> masked by position and window."""

    def compute(sc):
        _, t, s = sc.shape

        def cell(h, i, j):
            q_pos = s - t + i
            ok = j <= q_pos
            if window is not None:
                ok = tir.all(ok, q_pos - j < window)
            return tir.Select(ok, sc[h, i, j], tir.min_value("float32"))

        return te.compute(sc.shape, cell, name="causal_mask")

    return nn.op.tensor_expr_op(compute, "causal_mask", [scores])


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


def rope_tables(cos_table, sin_table, positions_from, t, rotary_dim: int, dtype: str):
    """cos/sin [T, rotary_dim] for positions past..past+T-1 (past = positions_from's length - T),
    read from tables the CPU computed with the reference's own code: WGSL's sin/cos may be as
    coarse as 2**-11 absolute (and SwiftShader's were, 3.7e-3 on SmolLM2's logits), the tables
    make them exact."""

    def compute(cos_t, sin_t, *shape_src):
        past = shape_src[0].shape[1] if shape_src else 0
        cos = te.compute((t, rotary_dim), lambda i, j: tir.Cast(dtype, cos_t[past + i, j]), name="cos")
        sin = te.compute((t, rotary_dim), lambda i, j: tir.Cast(dtype, sin_t[past + i, j]), name="sin")
        return cos, sin

    args = [cos_table, sin_table] + ([positions_from] if positions_from is not None else [])
    return nn.op.tensor_expr_op(compute, "rope_table", args)


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


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, quant, dtype):
        self.spec = spec
        self.attn_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        self.self_attn = Attention(spec, layer, quant, dtype)
        self.mlp = MLP(spec, quant, dtype)
        if not spec.parallel_residual:
            self.mlp_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        if spec.sandwich_norms:
            self.attn_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
            self.mlp_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)

    def forward(self, x, cos, sin, past_k, past_v):
        normed = self.attn_norm(x)
        a, k, v = self.self_attn(normed, cos, sin, past_k, past_v)
        if self.spec.parallel_residual:
            return x + a + self.mlp(normed), k, v
        if self.spec.sandwich_norms:
            h = x + self.attn_post_norm(a)
            return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h))), k, v
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), k, v


class RelaxDecoder(nn.Module):
    """quant: None (float weights) or {"group_size", "symmetric"} for int4 packed weights."""

    def __init__(self, spec: DecoderSpec, rope_scaling: dict[str, float], quant, dtype: str = "float32",
                 context: int = 512):
        if dtype not in COMPUTE_DTYPES:
            raise EdgeSLMError(f"webgpu compute dtype must be one of {COMPUTE_DTYPES}, not {dtype}")
        self.spec, self.dtype, self.quant = spec, dtype, quant
        self.rope_keys = sorted(rope_scaling)
        if quant is None:
            self.embed_tokens = FloatLinear(spec.hidden_size, spec.vocab_size, False, dtype)
        else:
            self.embed_tokens = QuantLinear(spec.hidden_size, spec.vocab_size, quant["group_size"], quant["symmetric"], False, dtype)
        self.layers = nn.ModuleList([Block(spec, i, quant, dtype) for i in range(spec.num_layers)])
        self.norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        self.lm_head = None if spec.tie_embeddings else make_linear(spec.hidden_size, spec.vocab_size, False, quant, dtype)
        for key in self.rope_keys:  # positions 0..context-1 (export_params fills them)
            setattr(self, f"rope_cos_{key}", nn.Parameter((context, spec.rotary_dim), "float32"))
            setattr(self, f"rope_sin_{key}", nn.Parameter((context, spec.rotary_dim), "float32"))

    def _run(self, tokens, cache):
        s = self.spec
        t = tokens.shape[1]
        ids = nn.op.reshape(tokens, (t,))
        h = nn.op.reshape(self.embed_tokens.gather(ids), (1, t, s.hidden_size))
        if s.embed_scale is not None:
            h = h * nn.Tensor.from_const(np.array(s.embed_scale, dtype=self.dtype))
        layer_k = layer_v = [None] * s.num_layers
        if cache is not None:
            layer_k, layer_v = [], []
            for c in cache:  # one [2, kv_heads, past, head_dim] tensor per layer
                kc, vc = nn.op.split(c, 2, axis=0)
                layer_k.append(nn.op.reshape(kc, kc.shape[1:]))
                layer_v.append(nn.op.reshape(vc, vc.shape[1:]))
        first_cache = None if cache is None else layer_k[0]
        ropes = {}
        for key in self.rope_keys:
            ropes[key] = rope_tables(getattr(self, f"rope_cos_{key}"), getattr(self, f"rope_sin_{key}"), first_cache,
                                     t, s.rotary_dim, self.dtype)
        new = []
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[s.layer_rope[i]]
            h, k, v = layer(h, cos, sin, layer_k[i], layer_v[i])
            new.append(nn.op.concat([nn.op.reshape(k, (1, *k.shape)), nn.op.reshape(v, (1, *v.shape))], dim=0))
        h = self.norm(h)
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        logits = head(h).astype("float32")
        if s.final_softcap is not None:
            logits = nn.op.tanh(logits / s.final_softcap) * s.final_softcap
        return logits, tuple(new)

    def forward_first(self, tokens):
        return self._run(tokens, None)

    def forward(self, tokens, cache):
        return self._run(tokens, cache)

    def get_default_spec(self):
        s = self.spec
        # one tensor per layer, not one stacked tensor: stacking 30 layers fuses into a kernel with
        # 31 storage buffers, over WebGPU's maxStorageBuffersPerShaderStage (8 by default)
        cache = [nn.spec.Tensor([2, s.num_kv_heads, "past", s.head_dim], self.dtype) for _ in range(s.num_layers)]
        mode = {"param_mode": "packed", "effect_mode": "none"}
        return nn.spec.ModuleSpec.from_raw(
            {
                "forward_first": {"tokens": nn.spec.Tensor([1, "seq_len"], "int32"), "$": mode},
                "forward": {"tokens": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": mode},
            },
            self,
        )


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
