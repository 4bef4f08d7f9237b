"""The one memory calculator: weight bytes per precision and KV-cache bytes per context.

`edgeslm info` (a loaded model) and `edgeslm recommend` (a model described by its config.json alone)
both call these, so the two verbs agree to the byte for the same shape.
"""

from __future__ import annotations

# bytes per weight: int8 per-channel carries an fp16 scale per output row (taken here per 4,096
# weights), int4 group-32 an fp16 scale per 32 weights
PRECISIONS = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 2.0 / 4096, "int4-g32": 0.5 + 2.0 / 32}


def weight_bytes(parameters: int, precision: str) -> int:
    return int(parameters * PRECISIONS[precision])


def kv_slots(spec, context: int) -> int:
    """Cache positions summed over layers: a global layer holds `context`, a sliding-window layer at
    most its window (a ring buffer)."""
    return sum(min(context, spec.sliding_window) if local and spec.sliding_window else context
               for local in spec.layer_is_local)


def kv_cache_bytes(spec, context: int, bytes_per_value: int = 2) -> int:
    """K and V (kv_heads x head_dim each) for every cache slot of every layer."""
    return 2 * kv_slots(spec, context) * spec.num_kv_heads * spec.head_dim * bytes_per_value
