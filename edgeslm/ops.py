"""The seam between the decoder and the compute it needs.

The decoder calls `attention` and the linear functions below and nothing else for its heavy work.
On CUDA, with Triton importable, they reach the kernels in edgeslm.kernels; everywhere else (and
always while exporting, see `reference_only`) they reach the plain torch references that sit next
to those kernels. Every target therefore traces the same function the tests check.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_force_reference = os.environ.get("EDGESLM_REFERENCE_ONLY") == "1"
# Tests run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (see kernels_on_cpu).
_kernels_on_cpu = os.environ.get("EDGESLM_KERNELS_ON_CPU") == "1"


@contextlib.contextmanager
def reference_only():
    """Within this block every op takes the torch reference (export, parity checks)."""
    global _force_reference
    saved, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = saved


@contextlib.contextmanager
def kernels_on_cpu():
    """Within this block CPU tensors take the Triton kernels too. Only meaningful with
    TRITON_INTERPRET=1 set before Triton is imported (the kernel tests do this)."""
    global _kernels_on_cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ops.kernels_on_cpu() needs TRITON_INTERPRET=1 set before the kernels are imported")
    saved, _kernels_on_cpu = _kernels_on_cpu, True
    try:
        yield
    finally:
        _kernels_on_cpu = saved


@functools.cache
def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _use_kernels(x: torch.Tensor) -> bool:
    if _force_reference or torch.compiler.is_compiling():
        return False
    return (x.is_cuda or (_kernels_on_cpu and x.device.type == "cpu")) and _triton_available()


def attention(q, k, v, q_pos, k_pos, *, scale: float, softcap: float | None = None, window: int | None = None):
    """Causal GQA attention by absolute positions.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; q_pos: [T] int64; k_pos: [S] int64 with -1 for an empty
    cache slot. Query t sees key s when 0 <= k_pos[s] <= q_pos[t] and, with a window,
    q_pos[t] - k_pos[s] < window. Positions (not slot order) carry the mask, which is what lets a
    sliding-window layer keep a ring buffer.
    """
    # The attention kernel has no backward: training through attention (LoRA) takes the reference.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if _use_kernels(q) and not needs_grad:
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
