"""Zeroed int32 tickets for the kernels that merge split-K / split-KV parts in one launch: the last
program of a tile to finish (an atomic increment) does the merge and re-arms its ticket to zero, so a
buffer is allocated and zeroed once per device and stream. A CUDA graph capture gets a fresh one,
zeroed inside the graph."""

from __future__ import annotations

import torch

TICKETS: dict = {}


def split_tickets(device, count: int) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = TICKETS.get(key)
    if buf is None or buf.numel() < count:
        buf = TICKETS[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return buf
