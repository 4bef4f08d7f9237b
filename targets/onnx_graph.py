"""The decoder as one onnxruntime-genai graph, written node by node from the Decoder's spec and modules.

    input_ids [B, S] int64, attention_mask [B, P+S] int64, past_key_values.N.key/value [B, Hkv, *, D]
      -> logits [B, 1, V] float32 (the last position's), present.N.key/value [B, Hkv, *, D]

Every layer is the decoder's own layer, in ONNX Runtime's fused contrib operators:
  - norms: SimplifiedLayerNormalization, and SkipSimplifiedLayerNormalization where a residual add
    feeds the next norm (LayerNormalization / SkipLayerNormalization for LayerNorm families); a
    Gemma norm's (1 + w) is its scale;
  - linears: com.microsoft::MatMulNBits whose B is our packed qweight byte for byte (our int4
    layout is MatMulNBits' bits=4 layout); q/k/v and gate/up are packed along N (their code rows
    concatenated), as genai's builder packs them; fp16 scales on disk, Cast to fp32 in the graph
    (onnxruntime folds the Cast at load); asymmetric zero points packed two per byte;
  - embedding: com.microsoft::GatherBlockQuantized over the same packed table that the tied
    lm_head's MatMulNBits reads, so the table is stored once;
  - attention: com.microsoft::GroupQueryAttention with rotary inside (do_rotary, cos/sin caches per
    rope table with the rope's attention scaling folded in), Gemma 2's soft-cap (softcap), sliding
    window (local_window_size), and one KV buffer shared by past and present (genai's
    past_present_share_buffer);
  - final soft-cap: Div, Tanh, Mul;
  - the lm_head reads the last position only (a Slice before it), so the logits output is
    [B, 1, V]: a generator samples from the last position alone, and onnxruntime-genai recognises
    a logits output whose dim 1 is 1 as a pruned model (its builder's prune_lm_head). A prefill of
    S tokens then runs the largest matmul (V x hidden) once rather than S times.

A feature GroupQueryAttention cannot express (on the CPU EP) gets a per-layer fallback, recorded in
the graph facts (`attention_fallbacks`, layer -> what):
  - partial rotary (StableLM 2, rotary_dim < head_dim): com.microsoft::RotaryEmbedding
    (rotary_embedding_dim) on q and k before the attention, positions computed from the mask;
  - q/k norm (Gemma 3): GQA's q_norm_weight inputs exist on CUDA/WebGPU only, so the per-head norms
    are SimplifiedLayerNormalization over [B, S, heads, D] before the attention (rotary stays fused).
"""

from __future__ import annotations

import numpy as np
import torch

OPSET = 18
MS = "com.microsoft"

IO = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "logits": "logits",
    "past_key": "past_key_values.%d.key",
    "past_value": "past_key_values.%d.value",
    "present_key": "present.%d.key",
    "present_value": "present.%d.value",
}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class Graph:
    """Nodes and initializers; names are unique by construction (prefix + counter)."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], {}, [], []
        self.count = 0
        self._consts = {}

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.inits:
            raise ValueError(f"duplicate initializer {name}")
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer (shared by value)."""
        arr = np.array(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"/const/{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str, outputs: int | list = 1, domain: str | None = None, **attrs):
        from onnx import helper

        self.count += 1
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name,
                                           domain=domain or "", **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


class DecoderGraph:
    """Writes the graph of one Decoder (float or int4 from qformat.py)."""

    def __init__(self, model, context_length: int, accuracy_level: int):
        self.m, self.spec, self.g = model, model.spec, Graph()
        self.context, self.level = context_length, accuracy_level
        self.facts = {"fused_ops": {}, "attention_fallbacks": {}}

    # ------------------------------------------------------------ building blocks

    def linear(self, x: str, mods: list, name: str) -> str:
        """x @ [W_0; W_1; ...].T (+ bias): one MatMulNBits (quantized) or MatMul (float) over the
        modules' rows concatenated along N."""
        from edgeslm.schemes.base import QuantizedLinear

        g = self.g
        n = sum(m.out_features for m in mods)
        k = mods[0].in_features
        biases = [m.bias for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features)
                              for b, m in zip(biases, mods)])
        if all(isinstance(m, QuantizedLinear) for m in mods):
            ws = [m.nbits() for m in mods]  # the scheme's own MatMulNBits encoding of its codes
            if len({(w.bits, w.block_size, w.zero_points is None) for w in ws}) != 1:
                raise ValueError(f"{name}: linears of different layouts cannot be packed together")
            bits, bs = ws[0].bits, ws[0].block_size
            b_name = g.init(f"{name}.qweight", _np(torch.cat([w.blob for w in ws])))
            scales = self._scales(g.init(f"{name}.scales", _np(torch.cat([w.scales for w in ws]))), name)
            zp = ""
            if ws[0].zero_points is not None:
                zp = g.init(f"{name}.zero_points", _np(torch.cat([w.zero_points for w in ws])))
            return self._matmul_nbits(x, b_name, scales, zp, n, k, bits, bs, name, bias)
        if any(isinstance(m, QuantizedLinear) for m in mods):
            raise ValueError(f"{name}: quantized and float linears cannot be packed together")
        w = torch.cat([m.weight.detach().float() for m in mods]).T
        y = g.op("MatMul", [x, g.init(f"{name}.weight_t", _np(w))], name)
        self._count("MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", _np(bias))], f"{name}/bias")
        return y

    def _scales(self, fp16_name: str, name: str) -> str:
        # MatMulNBits wants scales in A's type; the fp16 file tensor is widened once at load
        return self.g.op("Cast", [fp16_name], f"{name}/scales_f32", to=1)

    def _matmul_nbits(self, x, b_name, scales, zp, n, k, bits, gs, name, bias=None) -> str:
        inputs = [x, b_name, scales, zp]
        if bias is not None:
            inputs += ["", self.g.init(f"{name}.bias", _np(bias))]
        self._count("MatMulNBits")
        return self.g.op("MatMulNBits", inputs, name, domain=MS, K=k, N=n, bits=bits, block_size=gs,
                         accuracy_level=self.level)

    def _count(self, op):
        self.facts["fused_ops"][op] = self.facts["fused_ops"].get(op, 0) + 1

    def norm_weight(self, norm, name: str) -> str:
        w = norm.weight.detach().float()
        if norm.kind == "rms_gemma":
            w = 1.0 + w  # Gemma stores w - 1
        return self.g.init(name, _np(w))

    def norm(self, x: str, norm, name: str) -> str:
        g = self.g
        if norm.kind == "layer":
            self._count("LayerNormalization")
            return g.op("LayerNormalization", [x, self.norm_weight(norm, f"{name}.weight"),
                                               g.init(f"{name}.bias", _np(norm.bias.detach().float()))],
                        name, axis=-1, epsilon=float(norm.eps))
        self._count("SimplifiedLayerNormalization")
        return g.op("SimplifiedLayerNormalization", [x, self.norm_weight(norm, f"{name}.weight")], name,
                    axis=-1, epsilon=float(norm.eps), stash_type=1)

    def add_norm(self, delta: str, residual: str, norm, name: str) -> tuple[str, str]:
        """(residual + delta, norm(residual + delta)) in one Skip*Normalization node."""
        g = self.g
        outs = [f"{name}/normed", "", "", f"{name}/sum"]
        if norm.kind == "layer":
            self._count("SkipLayerNormalization")
            g.op("SkipLayerNormalization", [delta, residual, self.norm_weight(norm, f"{name}.weight"),
                                            g.init(f"{name}.bias", _np(norm.bias.detach().float()))],
                 name, outputs=outs, domain=MS, epsilon=float(norm.eps))
        else:
            self._count("SkipSimplifiedLayerNormalization")
            g.op("SkipSimplifiedLayerNormalization", [delta, residual, self.norm_weight(norm, f"{name}.weight")],
                 name, outputs=outs, domain=MS, epsilon=float(norm.eps))
        return outs[3], outs[0]

    # ------------------------------------------------------------ the pieces of the decoder

    def embedding(self, ids: str) -> str:
        from edgeslm.model import Embedding
        from edgeslm.schemes.base import QuantizedEmbedding

        g, emb = self.g, self.m.embed_tokens
        if isinstance(emb, QuantizedEmbedding):
            w = emb.nbits()
            v, k, bits, gs = emb.out_features, emb.in_features, w.bits, w.block_size
            # one initializer for the gather and (tied) the lm_head, in MatMulNBits' [N, K/G, G*bits/8]
            # shape; GatherBlockQuantized reads it as one block of G codes along the last axis
            b_name = g.init("embed_tokens.qweight", _np(w.blob))
            scales = self._scales(g.init("embed_tokens.scales", _np(w.scales)), "embed_tokens")
            zp = ""
            if w.zero_points is not None:
                zp = g.init("embed_tokens.zero_points", _np(w.zero_points))
            self.table = (b_name, scales, zp, v, k, bits, gs)
            blocks = g.op("Reshape", [scales, g.const([v, k // gs, 1])], "embed_tokens/scales_blocks")
            gzp = []
            if zp:  # one zero point per block: [V, K/G, 1] codes, packed along the (size-1) last axis
                gzp = [g.init("embed_tokens.zero_points_blocks", _np(w.block_zero_points))]
            self._count("GatherBlockQuantized")
            h = g.op("GatherBlockQuantized", [b_name, ids, blocks] + gzp, "embed_tokens/gather",
                     domain=MS, bits=bits, block_size=gs, gather_axis=0, quantize_axis=2)
            h = g.op("Reshape", [h, g.const([0, 0, k])], "embed_tokens")
        elif isinstance(emb, Embedding):
            self.table = g.init("embed_tokens.weight", _np(emb.weight.detach().float()))
            h = g.op("Gather", [self.table, ids], "embed_tokens", axis=0)
        else:
            raise ValueError(f"no ONNX mapping for {type(emb).__name__}")
        if self.spec.embed_scale is not None:
            h = g.op("Mul", [h, g.const(np.float32(self.spec.embed_scale), np.float32)], "embed_scale")
        return h

    def lm_head(self, h: str) -> str:
        from edgeslm.model import Embedding

        g = self.g
        if self.m.lm_head is not None:
            return self.linear(h, [self.m.lm_head], "lm_head")
        if isinstance(self.m.embed_tokens, Embedding):
            # tied float table: the transpose is folded at load (memory), the file holds one copy
            wt = g.op("Transpose", [self.table], "lm_head/transpose", perm=[1, 0])
            self._count("MatMul")
            return g.op("MatMul", [h, wt], "lm_head")
        b_name, scales, zp, v, k, bits, gs = self.table
        return self._matmul_nbits(h, b_name, scales, zp, v, k, bits, gs, "lm_head")

    def rope_caches(self):
        """cos/sin [context, rotary_dim/2] per rope table, from the decoder's own rope()."""
        s, g = self.spec, self.g
        pos = torch.arange(self.context)
        self.caches = {}
        for key in self.m.rope_scaling:
            cos, sin = self.m.rope(key, pos, torch.float32)
            half = s.rotary_dim // 2
            self.caches[key] = (g.init(f"rope.{key}.cos_cache", _np(cos[:, :half])),
                                g.init(f"rope.{key}.sin_cache", _np(sin[:, :half])))

    def mask_inputs(self):
        """seqlens_k = sum(mask) - 1 and total_sequence_length, both int32, as GQA wants them."""
        g = self.g
        total = g.op("ReduceSum", [IO["attention_mask"], g.const([1])], "mask/sum", keepdims=0)
        self.seqlens_k = g.op("Cast", [g.op("Sub", [total, g.const(1)], "mask/minus1")], "mask/seqlens_k", to=6)
        shape = g.op("Shape", [IO["attention_mask"]], "mask/shape")
        self.total_len = g.op("Cast", [g.op("Gather", [shape, g.const(1)], "mask/total", axis=0)],
                              "mask/total_len", to=6)
        self.positions = None

    def position_ids(self) -> str:
        """[B, S] absolute positions (past length + 0..S-1), for ops outside GQA that need them."""
        if self.positions is None:
            g = self.g
            ids_shape = g.op("Shape", [IO["input_ids"]], "pos/ids_shape")
            s = g.op("Gather", [ids_shape, g.const(1)], "pos/s", axis=0)
            seqlens = g.op("Cast", [self.seqlens_k], "pos/seqlens64", to=7)
            past = g.op("Sub", [g.op("Add", [seqlens, g.const(1)], "pos/total"), s], "pos/past")  # [B]
            ar = g.op("Range", [g.const(0), s, g.const(1)], "pos/range")
            self.positions = g.op("Add", [g.op("Unsqueeze", [past, g.const([1])], "pos/past2"),
                                          g.op("Unsqueeze", [ar, g.const([0])], "pos/range2")], "pos/ids")
        return self.positions

    def attention(self, i: int, x: str) -> str:
        s, g = self.spec, self.g
        at = self.m.layers[i].self_attn
        p = f"layers.{i}.attn"
        h, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        qkv = self.linear(x, [at.q_proj, at.k_proj, at.v_proj], f"{p}.qkv_proj")
        cos, sin = self.caches[s.layer_rope[i]]
        attrs = dict(num_heads=h, kv_num_heads=hkv, scale=float(s.attn_scale))
        if s.attn_softcap:
            attrs["softcap"] = float(s.attn_softcap)
        if s.layer_is_local[i] and s.sliding_window:
            # both count the query's own key: position p sees keys p - window + 1 .. p
            attrs["local_window_size"] = int(s.sliding_window)
        q, k, v = qkv, "", ""
        if s.rotary_dim == d:
            attrs.update(do_rotary=1, rotary_interleaved=0)
            rope_in = [cos, sin]
        else:
            # partial rotary: GQA's fused rotary turns the whole head; rotate the first rotary_dim
            # dims of q and k with RotaryEmbedding (rotary_embedding_dim) before the attention
            self.facts["attention_fallbacks"][str(i)] = "partial rotary: RotaryEmbedding before GroupQueryAttention"
            q, k, v = g.op("Split", [qkv, g.const([h * d, hkv * d, hkv * d])], f"{p}/split", outputs=3, axis=-1)
            pos = self.position_ids()
            q = g.op("RotaryEmbedding", [q, pos, cos, sin], f"{p}/rope_q", domain=MS, interleaved=0,
                     num_heads=h, rotary_embedding_dim=s.rotary_dim)
            k = g.op("RotaryEmbedding", [k, pos, cos, sin], f"{p}/rope_k", domain=MS, interleaved=0,
                     num_heads=hkv, rotary_embedding_dim=s.rotary_dim)
            self._count("RotaryEmbedding")
            rope_in = ["", ""]
        if s.qk_norm:
            # GQA's fused q/k norm inputs run on CUDA and WebGPU only: on CPU the per-head norms are
            # SimplifiedLayerNormalization over [B, S, heads, D] before the attention
            self.facts["attention_fallbacks"][str(i)] = "q/k norm: SimplifiedLayerNormalization before GroupQueryAttention"
            if not k:
                q, k, v = g.op("Split", [qkv, g.const([h * d, hkv * d, hkv * d])], f"{p}/split", outputs=3, axis=-1)
            q = self.head_norm(q, at.q_norm, h, f"{p}.q_norm")
            k = self.head_norm(k, at.k_norm, hkv, f"{p}.k_norm")
        past_k, past_v = IO["past_key"] % i, IO["past_value"] % i
        outs = [f"{p}/out", IO["present_key"] % i, IO["present_value"] % i]
        self._count("GroupQueryAttention")
        g.op("GroupQueryAttention", [q, k, v, past_k, past_v, self.seqlens_k, self.total_len, *rope_in],
             f"{p}/gqa", outputs=outs, domain=MS, **attrs)
        return self.linear(outs[0], [at.o_proj], f"{p}.o_proj")

    def head_norm(self, x: str, norm, heads: int, name: str) -> str:
        g, d = self.g, self.spec.head_dim
        y = g.op("Reshape", [x, g.const([0, 0, heads, d])], f"{name}/heads")
        y = self.norm(y, norm, name)
        return g.op("Reshape", [y, g.const([0, 0, heads * d])], f"{name}/flat")

    def mlp(self, i: int, x: str) -> str:
        s, g = self.spec, self.g
        mlp = self.m.layers[i].mlp
        p = f"layers.{i}.mlp"
        gu = self.linear(x, [mlp.gate_proj, mlp.up_proj], f"{p}.gate_up_proj")
        gate, up = g.op("Split", [gu, g.const([s.intermediate_size, s.intermediate_size])], f"{p}/split",
                        outputs=2, axis=-1)
        if s.act == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        else:
            self._count("FastGelu")
            act = g.op("FastGelu", [gate], f"{p}/gelu", domain=MS)
        return self.linear(g.op("Mul", [act, up], f"{p}/gated"), [mlp.down_proj], f"{p}.down_proj")

    # ------------------------------------------------------------ the whole graph

    def build(self):
        from onnx import TensorProto, helper

        s, g, m = self.spec, self.g, self.m
        self.mask_inputs()
        self.rope_caches()
        x = self.embedding(IO["input_ids"])
        layers = m.layers
        normed = self.norm(x, layers[0].attn_norm, "layers.0.attn_norm")
        for i, layer in enumerate(layers):
            p = f"layers.{i}"
            nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else m.norm
            nxt_name = f"layers.{i + 1}.attn_norm" if i + 1 < len(layers) else "norm"
            a = self.attention(i, normed)
            if s.parallel_residual:
                mo = self.mlp(i, normed)
                xa = g.op("Add", [x, a], f"{p}/residual_attn")
                x, normed = self.add_norm(mo, xa, nxt, nxt_name)
                continue
            if s.sandwich_norms:
                a = self.norm(a, layer.attn_post_norm, f"{p}.attn_post_norm")
            x, mlp_in = self.add_norm(a, x, layer.mlp_norm, f"{p}.mlp_norm")
            mo = self.mlp(i, mlp_in)
            if s.sandwich_norms:
                mo = self.norm(mo, layer.mlp_post_norm, f"{p}.mlp_post_norm")
            x, normed = self.add_norm(mo, x, nxt, nxt_name)
        last = g.op("Slice", [normed, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])], "last_position")
        logits = self.lm_head(last)
        if s.final_softcap is not None:
            c = g.const(np.float32(s.final_softcap), np.float32)
            logits = g.op("Tanh", [g.op("Div", [logits, c], "final_softcap/div")], "final_softcap/tanh")
            logits = g.op("Mul", [logits, c], "final_softcap/mul")
        g.op("Identity", [logits], "logits", outputs=[IO["logits"]])

        f32 = TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info(IO["input_ids"], TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info(IO["attention_mask"], TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info(IO["logits"], f32, ["batch_size", 1, s.vocab_size])]
        for i in range(s.num_layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(IO[f"past_{kv}"] % i, f32,
                                                            ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]))
                outputs.append(helper.make_tensor_value_info(IO[f"present_{kv}"] % i, f32,
                                                             ["batch_size", s.num_kv_heads, "total_sequence_length", s.head_dim]))
        graph = helper.make_graph(g.nodes, "edgeslm_decoder", inputs, outputs, list(g.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edgeslm")
        model.ir_version = 10
        return model, self.facts


def build_decoder_graph(model, context_length: int, accuracy_level: int):
    """-> (onnx.ModelProto with inline initializers, facts for the manifest)."""
    return DecoderGraph(model, context_length, accuracy_level).build()
