"""The decoder as a model library for WebLLM's engine (`@mlc-ai/web-llm` CreateMLCEngine).

What the engine (LLMChatPipeline) calls, and what this module exports:

  embed(input_ids [T] i32, params) -> [T, hidden]
  prefill(input_embed [1, T, hidden], kv_cache, params) -> (logits [1, 1, vocab] of the last token, kv_cache)
  decode(input_embed [1, 1, hidden], kv_cache, params) -> (logits [1, 1, vocab], kv_cache)
  create_tir_paged_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding) -> kv_cache
  _metadata() -> JSON: kv_state_kind, prefill_chunk_size, context/sliding window, params (names,
                 shapes, dtypes, in the tensor-cache order), memory_usage
  the six sampling functions of sampling.py

The KV cache is the TVM runtime's paged cache (`vm.builtin.paged_attention_kv_cache_create`, in
the wasm), driven by the engine through the `vm.builtin.kv_state_*` functions; the attention
kernels it calls are softcap_attention.py's. RoPE is applied here, from tables the CPU computed
with the reference's own code, at the positions the cache reports (the cache runs with RoPE off).

Everything else (norms, MLP, int4 or float linears, embedding scale, final soft-cap) is
relax_model.py's, so both the tvmjs and the WebLLM artifacts compute one function.
"""

from __future__ import annotations

import json

import tvm

from tvm import relax as rx
from tvm import te
from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm import kv_cache as tkv
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from edgeslm.config import DecoderSpec
from edgeslm.errors import EdgeSLMError

from . import softcap_attention as sa
from .relax_model import COMPUTE_DTYPES, MLP, FloatLinear, Norm, QuantLinear, make_linear, rope

ROPE_NONE = 0  # the cache's RoPE mode "none": q and k arrive rotated
ATTN_MHA = 0


class SoftcapPagedKVCache(tkv.PagedKVCache):
    """The runtime's paged KV cache with this package's attention kernels (soft-cap, per-layer
    windows) in the slots of TVM's; page management, RoPE split and state merging are TVM's."""

    def __init__(self, spec: DecoderSpec, dtype: str, gpu: bool, target, max_batch_size, max_total_seq_len,
                 prefill_chunk_size, page_size, support_sliding_window):
        s = spec
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        bb = rx.BlockBuilder.current()
        cap = s.attn_softcap
        win = s.sliding_window if any(s.layer_is_local) else None

        def tirx_fn(func, name):
            return rx.Tuple([tvm.ir.StringImm("tirx"), bb.add_func(func, name)])

        def kernel(make, name):
            return tirx_fn(make(hkv, hq, d, dtype, cap, win, gpu).with_attr("global_symbol", name), name)

        if gpu:
            merge = tkv._merge_state_inplace(hq, d, dtype, target, "edgeslm_attention_merge_state")
            copy_page = tkv._copy_single_page(hkv, page_size, d, dtype, target)
            compact = tkv._compact_kv_copy(hkv, d, dtype, target)
        else:
            merge = tkv._merge_state_inplace_cpu(dtype)
            copy_page = tkv._copy_single_page_cpu(hkv, page_size, d, dtype)
            compact = tkv._compact_kv_copy_cpu(hkv, d, dtype)
        none = rx.Tuple([])
        args = [
            rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window]),
            rx.ShapeExpr([0, s.num_layers]),  # one pipeline stage holds every layer
            rx.prim_value(hq), rx.prim_value(hkv), rx.prim_value(d), rx.prim_value(d),
            rx.ShapeExpr([ATTN_MHA] * s.num_layers),
            rx.prim_value(False),  # no KV transfer between engines
            rx.prim_value(ROPE_NONE), rx.prim_value(1.0), rx.prim_value(10000.0),
            rx.prim_value(0),  # no RoPE extension factors
            rx.op.zeros((), dtype),  # the pages' dtype and device
            bb.add_func(tkv._kv_cache_transpose_append(hkv, d, dtype), "kv_cache_transpose_append"),
            bb.add_func(tkv._kv_cache_transpose_append_mla(d, dtype), "kv_cache_transpose_append_mla"),
            kernel(sa.ragged_prefill, "edgeslm_attention_prefill_ragged"),
            kernel(sa.paged_prefill, "edgeslm_attention_prefill"),
            kernel(sa.paged_decode, "edgeslm_attention_decode"),
            none, none,  # the runtime's own sliding window (ring + attention sink) stays off
            none, none,  # tree attention (speculative decoding): not provided
            none,  # MLA
            rx.Tuple([bb.add_func(merge, "edgeslm_attention_merge_state")]),
            bb.add_func(llama_rope_with_position_map(10000.0, 1.0, d, hq, hkv, dtype, {}, d), "tir_split_rotary"),
            bb.add_func(copy_page, "kv_cache_copy_single_page"),
            bb.add_func(tkv._kv_cache_debug_get_kv(s.num_layers, hkv, d, dtype), "kv_cache_debug_get_kv"),
            bb.add_func(compact, "kv_cache_compact_kv_copy"),
        ]
        super().__init__(_expr=rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *args,
                                                   ty_args=rx.AnyType()), _name="paged_kv_cache")


class PagedAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, quant, dtype: str):
        h, d = spec.hidden_size, spec.head_dim
        self.spec, self.layer = spec, layer
        self.local = bool(spec.layer_is_local[layer]) and spec.sliding_window is not None
        self.q_proj = make_linear(h, spec.num_heads * d, spec.qkv_bias, quant, dtype)
        self.k_proj = make_linear(h, spec.num_kv_heads * d, spec.qkv_bias, quant, dtype)
        self.v_proj = make_linear(h, spec.num_kv_heads * d, spec.qkv_bias, quant, dtype)
        self.o_proj = make_linear(spec.num_heads * d, h, spec.o_bias, quant, dtype)
        if spec.qk_norm:
            self.q_norm = Norm(spec.norm, d, spec.norm_eps, dtype)
            self.k_norm = Norm(spec.norm, d, spec.norm_eps, dtype)

    def forward(self, x, cos, sin, cache: tkv.PagedKVCache):
        s = self.spec
        t = x.shape[1]
        q = nn.op.reshape(self.q_proj(x), (t, s.num_heads, s.head_dim))
        k = nn.op.reshape(self.k_proj(x), (t, s.num_kv_heads, s.head_dim))
        v = nn.op.reshape(self.v_proj(x), (t, s.num_kv_heads, s.head_dim))
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin, s.rotary_dim), rope(k, cos, sin, s.rotary_dim)
        qkv = nn.op.reshape(nn.op.concat([q, k, v], dim=1), (1, t, s.num_heads + 2 * s.num_kv_heads, s.head_dim))
        # the sign of sm_scale is the kernels' window switch (see softcap_attention.py)
        scale = -s.attn_scale if self.local else s.attn_scale
        out = cache.attention_with_fused_qkv(self.layer, qkv, s.num_heads, scale)
        return self.o_proj(nn.op.reshape(out, (1, t, s.num_heads * s.head_dim)))


class PagedBlock(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, quant, dtype):
        self.spec = spec
        self.attn_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        self.self_attn = PagedAttention(spec, layer, quant, dtype)
        self.mlp = MLP(spec, quant, dtype)
        if not spec.parallel_residual:
            self.mlp_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        if spec.sandwich_norms:
            self.attn_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
            self.mlp_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)

    def forward(self, x, cos, sin, cache):
        normed = self.attn_norm(x)
        a = self.self_attn(normed, cos, sin, cache)
        if self.spec.parallel_residual:
            return x + a + self.mlp(normed)
        if self.spec.sandwich_norms:
            h = x + self.attn_post_norm(a)
            return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h)))
        h = x + a
        return h + self.mlp(self.mlp_norm(h))


def rope_at(cos_table, sin_table, positions, rotary_dim: int, dtype: str):
    """cos/sin [T, rotary_dim] gathered at the cache's query positions [T]."""

    def compute(cos_t, sin_t, pos):
        t = pos.shape[0]
        cos = te.compute((t, rotary_dim), lambda i, j: tir.Cast(dtype, cos_t[pos[i], j]), name="cos")
        sin = te.compute((t, rotary_dim), lambda i, j: tir.Cast(dtype, sin_t[pos[i], j]), name="sin")
        return cos, sin

    return nn.op.tensor_expr_op(compute, "rope_at", [cos_table, sin_table, positions])


def last_row(h):
    """[1, T, H] -> [1, 1, H]: the last position, the only one whose logits the engine reads."""

    def compute(x):
        t = x.shape[1]
        return te.compute((1, 1, x.shape[2]), lambda b, i, c: x[b, t - 1, c], name="last_row")

    return nn.op.tensor_expr_op(compute, "last_row", [h])


class WebLLMDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec, rope_scaling: dict[str, float], quant, dtype: str, context: int,
                 target, gpu: bool):
        if dtype not in COMPUTE_DTYPES:
            raise EdgeSLMError(f"webgpu compute dtype must be one of {COMPUTE_DTYPES}, not {dtype}")
        self.spec, self.dtype, self.quant, self.context = spec, dtype, quant, context
        self.target, self.gpu = target, gpu
        self.rope_keys = sorted(rope_scaling)
        if quant is None:
            self.embed_tokens = FloatLinear(spec.hidden_size, spec.vocab_size, False, dtype)
        else:
            self.embed_tokens = QuantLinear(spec.hidden_size, spec.vocab_size, quant["group_size"], quant["symmetric"],
                                            False, dtype)
        self.layers = nn.ModuleList([PagedBlock(spec, i, quant, dtype) for i in range(spec.num_layers)])
        self.norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps, dtype)
        self.lm_head = None if spec.tie_embeddings else make_linear(spec.hidden_size, spec.vocab_size, False, quant, dtype)
        for key in self.rope_keys:
            setattr(self, f"rope_cos_{key}", nn.Parameter((context, spec.rotary_dim), "float32"))
            setattr(self, f"rope_sin_{key}", nn.Parameter((context, spec.rotary_dim), "float32"))

    def embed(self, input_ids):
        s = self.spec
        h = self.embed_tokens.gather(input_ids)
        if s.embed_scale is not None:
            h = h * nn.Tensor.from_const(__import__("numpy").array(s.embed_scale, dtype=self.dtype))
        return h

    def _logits(self, h):
        s = self.spec
        h = self.norm(h)
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        logits = head(h).astype("float32")
        if s.final_softcap is not None:
            logits = nn.op.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def _body(self, h, cache):
        s = self.spec
        t = h.shape[1]
        positions = cache.get_query_positions(t)
        ropes = {key: rope_at(getattr(self, f"rope_cos_{key}"), getattr(self, f"rope_sin_{key}"), positions,
                              s.rotary_dim, self.dtype) for key in self.rope_keys}
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[s.layer_rope[i]]
            h = layer(h, cos, sin, cache)
        return h

    def prefill(self, input_embed, paged_kv_cache):
        h = self._body(input_embed, paged_kv_cache)
        return self._logits(last_row(h)), paged_kv_cache

    def decode(self, input_embed, paged_kv_cache):
        h = self._body(input_embed, paged_kv_cache)
        return self._logits(h), paged_kv_cache

    def prefill_all_logits(self, input_embed, paged_kv_cache):
        """Every position's logits (not an engine function: verify and perplexity use it)."""
        h = self._body(input_embed, paged_kv_cache)
        return self._logits(h), paged_kv_cache

    def create_tir_paged_kv_cache(self, max_batch_size: tir.Var, max_total_seq_len: tir.Var,
                                  prefill_chunk_size: tir.Var, page_size: tir.Var, support_sliding_window: tir.Var):
        return SoftcapPagedKVCache(self.spec, self.dtype, self.gpu, self.target, max_batch_size, max_total_seq_len,
                                   prefill_chunk_size, page_size, support_sliding_window)

    def get_default_spec(self):
        s = self.spec
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=tkv.PagedKVCache)
        return nn.spec.ModuleSpec.from_raw(
            {
                "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
                "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", s.hidden_size], self.dtype),
                            "paged_kv_cache": cache, "$": packed},
                "decode": {"input_embed": nn.spec.Tensor([1, 1, s.hidden_size], self.dtype),
                           "paged_kv_cache": cache, "$": packed},
                "prefill_all_logits": {"input_embed": nn.spec.Tensor([1, "seq_len", s.hidden_size], self.dtype),
                                       "paged_kv_cache": cache, "$": packed},
                "create_tir_paged_kv_cache": {
                    "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                    "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
                },
            },
            self,
        )


def attach_metadata(mod, metadata: dict):
    """`_metadata`: a function returning the JSON string the engine parses at load."""
    bb = rx.BlockBuilder(mod)
    with bb.function("_metadata", []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    return bb.finalize()
