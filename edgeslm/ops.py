"""The seam between the decoder and the compute it needs.

The decoder calls `attention` and the linear functions below and nothing else for its heavy work.
On CUDA, with Triton importable, they reach the kernels in edgeslm.kernels; everywhere else (and
always while exporting, see `reference_only`) they reach the plain torch references that sit next
to those kernels. Every target therefore traces the same function the tests check.
"""

from __future__ import annotations

import contextlib
import os

import torch

_force_reference = os.environ.get("EDGESLM_REFERENCE_ONLY") == "1"


@contextlib.contextmanager
def reference_only():
    """Within this block every op takes the torch reference (export, parity checks)."""
    global _force_reference
    saved, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = saved


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and not _force_reference and not torch.compiler.is_compiling()


def attention(q, k, v, q_pos, k_pos, *, scale: float, softcap: float | None = None, window: int | None = None):
    """Causal GQA attention by absolute positions.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; q_pos: [T] int64; k_pos: [S] int64 with -1 for an empty
    cache slot. Query t sees key s when 0 <= k_pos[s] <= q_pos[t] and, with a window,
    q_pos[t] - k_pos[s] < window. Positions (not slot order) carry the mask, which is what lets a
    sliding-window layer keep a ring buffer.
    """
    if _use_kernels(q):
        from .kernels import softcap_attention

        return softcap_attention.attention(q, k, v, q_pos, k_pos, scale=scale, softcap=softcap, window=window)
    from .kernels.softcap_attention import attention_reference

    return attention_reference(q, k, v, q_pos, k_pos, scale=scale, softcap=softcap, window=window)


def linear(x, weight, bias=None):
    return torch.nn.functional.linear(x, weight, bias)


def int4_linear(x, qweight, scales, zeros, group_size: int, bias=None):
    """x @ dequant(W).T for the packed int4 layout documented in kernels/int4_matmul.py."""
    if _use_kernels(x):
        from .kernels import int4_matmul

        y = int4_matmul.int4_matmul(x, qweight, scales, zeros, group_size)
    else:
        from .kernels.int4_matmul import int4_matmul_reference

        y = int4_matmul_reference(x, qweight, scales, zeros, group_size)
    return y if bias is None else y + bias
