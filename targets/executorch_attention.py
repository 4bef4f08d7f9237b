"""The ExecuTorch target's KV attention: each layer's cache as mutable buffers of the program.

These modules replace the decoder's KVAttention in every layer (Decoder.swap_kv_attention), so
the projections, norms and rope stay the decoder's own; only the cache write and the attention
change. All of them are shape-polymorphic in T (the tokens of one forward call), so one
`forward(tokens, input_pos)` method serves prefill and decode.

  RuntimeKVAttention  global layer, no soft-cap: ExecuTorch's own LLM ops,
                      llama::update_cache writes k/v at input_pos into [1, L, Hkv, D] buffers and
                      llama::custom_sdpa attends causally over the first input_pos + T slots.
  RingKVAttention     sliding-window layer: a `window`-slot ring; the chunk attends over
                      (old ring ++ new keys), masked by absolute positions, then each slot takes
                      the newest new key of its residue class (a gather, so any T works,
                      including T > window).
  TracedKVAttention   global layer with a soft-cap (Gemma 2): the decoder's reference attention
                      over the whole [1, Hkv, L, D] cache, positions past input_pos + T masked.

Positions are derived from input_pos alone (model.ring_positions), so the cache carries no
bookkeeping and a new sequence needs no reset: it starts again at input_pos 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import ring_positions


def load_llm_ops():
    """Registers llama::update_cache / llama::custom_sdpa (export-time meta kernels and the runtime's
    kernels in the pybindings). Returns False when this executorch build lacks them."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means: no custom ops, keep the traced attention
        return False
    return hasattr(torch.ops.llama, "custom_sdpa") and hasattr(torch.ops.llama, "update_cache")


def _start(start_pos, t: int, slots: int):
    """input_pos as a SymInt the custom ops take, bounded for the exporter."""
    pos = start_pos.item()
    torch._check(pos >= 0)
    torch._check(pos + t <= slots)
    return pos


class RuntimeKVAttention(nn.Module):
    def __init__(self, spec, context: int):
        super().__init__()
        shape = (1, context, spec.num_kv_heads, spec.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.scale = float(spec.attn_scale)

    def forward(self, q, k, v, q_pos, start_pos, k_cache, v_cache, inplace):
        t = q.shape[2]
        pos = _start(start_pos, t, self.k_cache.shape[1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # the ops take [B, T, H, D]
        torch.ops.llama.update_cache(k, self.k_cache, pos)
        torch.ops.llama.update_cache(v, self.v_cache, pos)
        out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, pos, None, 0.0, True, self.scale)
        return out.transpose(1, 2), None, None


class _BufferedKVAttention(nn.Module):
    """K and V caches of `slots` positions as mutable buffers (ExecuTorch keeps them in the .pte's
    mutable state), attended by the decoder's own reference attention."""

    def __init__(self, spec, slots: int, reference_attention):
        super().__init__()
        shape = (1, spec.num_kv_heads, slots, spec.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.spec = spec
        self.attend = reference_attention


class RingKVAttention(_BufferedKVAttention):
    def __init__(self, spec, context: int, reference_attention):
        super().__init__(spec, min(spec.sliding_window, context), reference_attention)
        self.window = spec.sliding_window

    def forward(self, q, k, v, q_pos, start_pos, k_cache, v_cache, inplace):
        t, slots = q.shape[2], self.k_cache.shape[2]
        keys = torch.cat((self.k_cache, k), dim=2)
        values = torch.cat((self.v_cache, v), dim=2)
        k_pos = torch.cat((ring_positions(start_pos, slots), q_pos))
        out = self.attend(q, keys, values, q_pos, k_pos, scale=self.spec.attn_scale,
                          softcap=self.spec.attn_softcap, window=self.window)
        # slot s now holds the newest position p < start_pos + t with p % slots == s; the ones that
        # are new (p >= start_pos) come from this chunk, the rest stay
        src = ring_positions(start_pos + t, slots) - start_pos
        fresh = (src >= 0).view(1, 1, slots, 1)
        src = src.clamp(min=0)
        self.k_cache.copy_(torch.where(fresh, k.index_select(2, src), self.k_cache))
        self.v_cache.copy_(torch.where(fresh, v.index_select(2, src), self.v_cache))
        return out, None, None


class TracedKVAttention(_BufferedKVAttention):
    def __init__(self, spec, context: int, reference_attention):
        super().__init__(spec, context, reference_attention)

    def forward(self, q, k, v, q_pos, start_pos, k_cache, v_cache, inplace):
        t, slots = q.shape[2], self.k_cache.shape[2]
        _start(start_pos, t, slots)
        index = start_pos + torch.arange(t)
        self.k_cache.index_copy_(2, index, k)
        self.v_cache.index_copy_(2, index, v)
        idx = torch.arange(slots)
        k_pos = torch.where(idx < start_pos + t, idx, -1)
        out = self.attend(q, self.k_cache, self.v_cache, q_pos, k_pos, scale=self.spec.attn_scale,
                          softcap=self.spec.attn_softcap, window=None)
        return out, None, None


def swap_in_program_attention(decoder, context: int, use_llm_ops: bool = True) -> dict:
    """Replaces every layer's KVAttention by one of the modules above; returns {kind: layers}."""
    from ..ops import attention

    kinds = {}
    fast = use_llm_ops and load_llm_ops()

    def make(i, old):
        spec = decoder.spec
        if spec.layer_is_local[i] and spec.sliding_window and spec.sliding_window < context:
            module, kind = RingKVAttention(spec, context, attention), "ring (traced attention)"
        elif fast and spec.attn_softcap is None:
            module, kind = RuntimeKVAttention(spec, context), "llama::update_cache + llama::custom_sdpa"
        else:
            module, kind = TracedKVAttention(spec, context, attention), "traced attention (soft-cap)" if spec.attn_softcap else "traced attention"
        kinds.setdefault(kind, []).append(i)
        return module

    decoder.swap_kv_attention(make)
    return kinds
