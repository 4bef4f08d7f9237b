"""The one reference decoder, driven by DecoderSpec, with a static KV cache.

Families (see config.py): Llama 3.x / SmolLM / TinyLlama, Qwen 2.5, Phi-3, Gemma 2, Gemma 3 and
StableLM 2. Phi-3's fused qkv_proj / gate_up_proj are split when loading, so every family has the
same modules and the same parameter names.

The KV cache is a flat list [k0, v0, k1, v1, ...] of [B, Hkv, L, D] tensors. A global layer has
L = max_len slots indexed by position. A sliding-window (local) layer has L = window slots used as
a ring (position p lives in slot p % window), so its memory stays bounded however long the
sequence runs. Which position a slot holds is derived from how many tokens were written, so the
cache needs no bookkeeping tensors and exports as plain tensors.

`forward(tokens, start_pos, cache)` is one code path for prefill (T > 1) and decode (T == 1):
 - global layers write the new keys, then attend over the whole cache;
 - local layers at decode write into the ring, then attend over it;
 - local layers at prefill attend over (old ring ++ new keys) before writing, because a chunk
   longer than the window would overwrite keys its own first queries still need.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .config import DecoderSpec


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        # Gemma stores w - 1 and scales by (1 + w); start from the identity either way
        self.weight = nn.Parameter(torch.zeros(dim) if kind == "rms_gemma" else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x):
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms_gemma":
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)  # Llama casts before the weight, as transformers does


class Linear(nn.Module):
    """A float linear layer that calls through the ops seam. quantize.py swaps in int4/int8 ones."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token embedding; `project` is the tied lm_head that reuses the same table."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def project(self, h):
        return ops.linear(h, self.weight)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotateHalf(nn.Module):
    """rotate_half as a module of each attention layer, so that a target can compute it its own way."""

    def forward(self, x):
        return rotate_half(x)


def apply_rope(x, cos, sin, rotary_dim: int, rotate=rotate_half):
    """x: [B, H, T, D]; cos/sin: [T, rotary_dim]. Rotates the first rotary_dim dims (HF convention)."""
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x) * sin
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate(rot) * sin, keep), dim=-1)


class KVAttention(nn.Module):
    """The seam between a layer and its KV cache: writes the new keys and values, then attends.

    forward(q, k, v, q_pos, start_pos, k_cache, v_cache, inplace) -> (out, k_cache, v_cache), with
    q [B, H, T, D] and k, v [B, Hkv, T, D] after q/k-norm and rope. k_cache None means no cache:
    causal attention over this chunk alone (evaluation). A target that runs its runtime's fused
    attention or keeps the cache in its own buffers replaces this module in every layer
    (Decoder.swap_kv_attention); the projections, norms and rope around it stay the decoder's.
    """

    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.spec = spec
        self.is_local = spec.layer_is_local[layer]
        self.window = spec.sliding_window if self.is_local else None

    def forward(self, q, k, v, q_pos, start_pos, k_cache, v_cache, inplace: bool):
        t = q.shape[2]
        if k_cache is None:
            keys, values, k_pos = k, v, q_pos
        elif self.is_local and t > 1:
            keys = torch.cat((k_cache, k), dim=2)
            values = torch.cat((v_cache, v), dim=2)
            k_pos = torch.cat((ring_positions(start_pos, k_cache.shape[2]), q_pos))
            k_cache, v_cache = write_ring(k_cache, v_cache, k, v, start_pos, inplace)
        else:
            if self.is_local:
                k_cache, v_cache = write_ring(k_cache, v_cache, k, v, start_pos, inplace)
                k_pos = ring_positions(start_pos + t, k_cache.shape[2])
            else:
                slots = start_pos + torch.arange(t, device=q.device)
                k_cache = k_cache.index_copy_(2, slots, k) if inplace else k_cache.index_copy(2, slots, k)
                v_cache = v_cache.index_copy_(2, slots, v) if inplace else v_cache.index_copy(2, slots, v)
                idx = torch.arange(k_cache.shape[2], device=q.device)
                k_pos = torch.where(idx < start_pos + t, idx, -1)
            keys, values = k_cache, v_cache
        out = ops.attention(
            q, keys, values, q_pos, k_pos, scale=self.spec.attn_scale, softcap=self.spec.attn_softcap, window=self.window
        )
        return out, k_cache, v_cache


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.q_proj = Linear(h, spec.num_heads * d, spec.qkv_bias)
        self.k_proj = Linear(h, spec.num_kv_heads * d, spec.qkv_bias)
        self.v_proj = Linear(h, spec.num_kv_heads * d, spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * d, h, spec.o_bias)
        if spec.qk_norm:
            self.q_norm = Norm(spec.norm, d, spec.norm_eps)
            self.k_norm = Norm(spec.norm, d, spec.norm_eps)
        self.rotate_half = RotateHalf()
        self.kv_attention = KVAttention(spec, layer)

    def forward(self, x, cos, sin, q_pos, start_pos, k_cache, v_cache, inplace: bool):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin, self.spec.rotary_dim, self.rotate_half)
        k = apply_rope(k, cos, sin, self.spec.rotary_dim, self.rotate_half)
        out, k_cache, v_cache = self.kv_attention(q, k, v, q_pos, start_pos, k_cache, v_cache, inplace)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), k_cache, v_cache


def ring_positions(written, slots: int):
    """Absolute position held by each ring slot after `written` tokens; -1 where empty."""
    idx = torch.arange(slots, device=written.device if torch.is_tensor(written) else None)
    last = written - 1
    # last - idx >= -slots, so "+ slots" keeps the dividend non-negative: ExecuTorch 1.5's portable
    # remainder kernel rounds toward zero for negative int64 (C semantics), unlike torch
    pos = last - torch.remainder(last - idx + slots, slots)
    return torch.where(pos >= 0, pos, -1)


def write_ring(k_cache, v_cache, k, v, start_pos, inplace: bool):
    """Writes the last min(T, window) new keys into their ring slots (position % window)."""
    slots_n, t = k_cache.shape[2], k.shape[2]
    keep = min(t, slots_n)  # static: earlier tokens of a long chunk fall out of the window anyway
    slots = torch.remainder(start_pos + (t - keep) + torch.arange(keep, device=k.device), slots_n)
    k, v = k[:, :, t - keep :], v[:, :, t - keep :]
    if inplace:
        return k_cache.index_copy_(2, slots, k), v_cache.index_copy_(2, slots, v)
    return k_cache.index_copy(2, slots, k), v_cache.index_copy(2, slots, v)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(h, i, spec.mlp_bias)
        self.up_proj = Linear(h, i, spec.mlp_bias)
        self.down_proj = Linear(i, h, spec.mlp_bias)
        self.act = spec.act

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.spec = spec
        self.attn_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps)
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec)
        if not spec.parallel_residual:
            self.mlp_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps)
        if spec.sandwich_norms:
            self.attn_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps)
            self.mlp_post_norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps)

    def forward(self, x, cos, sin, q_pos, start_pos, k_cache, v_cache, inplace):
        normed = self.attn_norm(x)
        a, k_cache, v_cache = self.self_attn(normed, cos, sin, q_pos, start_pos, k_cache, v_cache, inplace)
        if self.spec.parallel_residual:
            return x + a + self.mlp(normed), k_cache, v_cache
        if self.spec.sandwich_norms:
            h = x + self.attn_post_norm(a)
            return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h))), k_cache, v_cache
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), k_cache, v_cache


class Decoder(nn.Module):
    def __init__(self, spec: DecoderSpec, rope: dict[str, tuple[torch.Tensor, float]]):
        """rope: rope key -> (inv_freq [rotary_dim/2], attention_scaling), see loading.rope_tables."""
        super().__init__()
        self.spec = spec
        self.hf_config = None  # set by the loader; kept to save the model and build tokenizers
        self.inplace_cache = False  # True: index_copy_ into the given cache (eager generation, ExecuTorch)
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = Norm(spec.norm, spec.hidden_size, spec.norm_eps)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.hidden_size, spec.vocab_size, False)
        self.rope_scaling = {}
        for key, (inv_freq, scaling) in rope.items():
            self.register_buffer(f"inv_freq_{key}", inv_freq.float(), persistent=False)
            self.rope_scaling[key] = float(scaling)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[torch.Tensor]:
        s = self.spec
        dtype = dtype or self.embed_tokens_dtype()
        cache = []
        for local in s.layer_is_local:
            n = min(s.sliding_window, max_len) if local and s.sliding_window else max_len
            shape = (batch, s.num_kv_heads, n, s.head_dim)
            cache += [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
        return cache

    def swap_kv_attention(self, make):
        """Replaces every layer's KVAttention by make(layer_index, kv_attention) (in place)."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.kv_attention = make(i, layer.self_attn.kv_attention)
        return self

    def embed_tokens_dtype(self):
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def rope(self, key: str, positions, dtype):
        inv_freq = getattr(self, f"inv_freq_{key}")
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope_scaling[key]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def forward(self, tokens, start_pos=0, cache: list[torch.Tensor] | None = None, last_only: bool = False):
        """tokens [B, T] -> (logits [B, T, V], cache). start_pos: int or 0-dim int64 tensor.
        last_only: logits [B, 1, V] of the last position (the lm_head runs once, not T times)."""
        s = self.spec
        start_pos = torch.as_tensor(start_pos, dtype=torch.long, device=tokens.device)
        t = tokens.shape[1]
        q_pos = start_pos + torch.arange(t, device=tokens.device)
        h = self.embed_tokens(tokens).to(self.norm.weight.dtype)  # int4/int8 tables dequantize to fp32
        if s.embed_scale is not None:
            h = h * torch.tensor(s.embed_scale, dtype=h.dtype)
        ropes = {key: self.rope(key, q_pos, h.dtype) for key in self.rope_scaling}
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[s.layer_rope[i]]
            kc, vc = (cache[2 * i], cache[2 * i + 1]) if cache is not None else (None, None)
            h, kc, vc = layer(h, cos, sin, q_pos, start_pos, kc, vc, self.inplace_cache)
            if new_cache is not None:
                new_cache += [kc, vc]
        h = self.norm(h[:, -1:] if last_only else h)
        logits = self.lm_head(h) if self.lm_head is not None else self.embed_tokens.project(h)
        if s.final_softcap is not None:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits, new_cache


@torch.no_grad()
def generate_greedy(model: Decoder, prompt: torch.Tensor, steps: int, max_len: int | None = None, chunk: int | None = None):
    """Greedy decoding with the static cache. prompt: [B, T0] -> (tokens [B, steps], logits [B, steps, V]).

    chunk=None prefills the prompt in one call; chunk=1 feeds it token by token.
    """
    b, t0 = prompt.shape
    max_len = max_len or t0 + steps
    was_inplace, model.inplace_cache = model.inplace_cache, True
    try:
        cache = model.new_cache(b, max_len, device=prompt.device)
        chunk = chunk or t0
        for start in range(0, t0, chunk):
            logits, cache = model(prompt[:, start : start + chunk], start, cache)
        last = logits[:, -1]
        tokens, all_logits = [], []
        for step in range(steps):
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt)
            all_logits.append(last.float())
            if step + 1 == steps:
                break
            logits, cache = model(nxt, t0 + step, cache)
            last = logits[:, -1]
    finally:
        model.inplace_cache = was_inplace
    return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def count_parameters(model: nn.Module) -> int:
    """Weights of the model as it was before quantization: float parameters plus the weights that
    quantized modules hold as packed `qweight` buffers (two int4 codes per byte)."""
    packed = sum(b.numel() * (2 if b.dtype == torch.uint8 else 1) for n, b in model.named_buffers()
                 if n.endswith("qweight"))
    return sum(p.numel() for p in model.parameters()) + packed


def causal_lm_loss(logits, tokens):
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def linear_names(model) -> list[str]:
    """Every decoder linear (attention and MLP projections, and an untied lm_head)."""
    return [name for name, m in model.named_modules() if isinstance(m, Linear)]
