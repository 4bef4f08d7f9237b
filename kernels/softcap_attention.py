"""Fused soft-capped, sliding-window, grouped-query attention.

Semantics (shared by the Triton kernels and `attention_reference`):
  q: [B, Hq, T, D], k/v: [B, Hkv, S, D], Hq % Hkv == 0 (query head h reads kv head h // (Hq//Hkv))
  q_pos: [T] absolute positions of the queries, k_pos: [S] absolute positions of the cache slots,
  -1 for an empty slot. Query t attends slot s iff 0 <= k_pos[s] <= q_pos[t] and, with a window W,
  q_pos[t] - k_pos[s] < W.
  scores = scale * q.k, then cap * tanh(scores / cap) when a soft-cap is given, then the mask,
  then softmax in fp32.

The Triton kernels are added by the kernels issue; this file already holds the reference that the
decoder and every export target trace.
"""

from __future__ import annotations

import torch


def attention_reference(q, k, v, q_pos, k_pos, *, scale, softcap=None, window=None):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    # [B, Hkv, G*T, D]: every query head of a group against its one kv head, no kv copies
    qg = q.reshape(b, hkv, group * t, d)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qp = q_pos.view(-1, 1)
    kp = k_pos.view(1, -1)
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    allowed = allowed.repeat(group, 1)  # rows are (g, t) in the same order as qg
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return out.reshape(b, hq, t, d)
