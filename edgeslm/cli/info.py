"""edgeslm info: what a model is and what it costs in memory."""

from __future__ import annotations

from ..memory import PRECISIONS, kv_cache_bytes, weight_bytes
from .common import add_json_argument, add_model_argument, emit, human_bytes, table

HELP = "architecture, parameter counts, weight bytes per precision and KV-cache memory per context"

CONTEXTS = (512, 2048, 8192)


def add_arguments(p):
    add_model_argument(p)
    add_json_argument(p)


def describe(model) -> dict:
    from ..model import count_parameters

    s = model.spec
    params = count_parameters(model)  # a quantized checkpoint counts its packed weights too
    embedding = s.vocab_size * s.hidden_size
    kv_bytes_per_token = {}
    memory = []
    for ctx in CONTEXTS:
        kv_fp16 = kv_cache_bytes(s, ctx, bytes_per_value=2)
        kv_bytes_per_token[ctx] = kv_fp16 / ctx
        memory.append({"context": ctx, "kv_cache_fp16_bytes": kv_fp16,
                       **{f"total_{k}_bytes": weight_bytes(params, k) + kv_fp16 for k in PRECISIONS}})
    return {
        "family": s.family,
        "layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "heads": s.num_heads,
        "kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "tied_embeddings": s.tie_embeddings,
        "sliding_window": s.sliding_window,
        "local_layers": sum(s.layer_is_local),
        "attn_softcap": s.attn_softcap,
        "final_softcap": s.final_softcap,
        "parameters": params,
        "embedding_parameters": embedding,
        "weight_bytes": {k: weight_bytes(params, k) for k in PRECISIONS},
        "memory": memory,
    }


def render(r: dict):
    print(f"{r['family']}: {r['parameters'] / 1e6:.1f}M parameters ({r['embedding_parameters'] / 1e6:.1f}M in the "
          f"embedding{', tied' if r['tied_embeddings'] else ''}), {r['layers']} layers, hidden {r['hidden_size']}, "
          f"{r['heads']} heads / {r['kv_heads']} kv heads x {r['head_dim']}")
    if r["sliding_window"]:
        print(f"sliding window {r['sliding_window']} on {r['local_layers']} of {r['layers']} layers")
    if r["attn_softcap"] or r["final_softcap"]:
        print(f"soft-caps: attention {r['attn_softcap']}, final {r['final_softcap']}")
    if r.get("checkpoint"):
        c = r["checkpoint"]
        print(f"quantized checkpoint: {c['scheme']} ({c['description']}), {human_bytes(c['weights_bytes'])} of "
              f"weights, {c['bytes_per_param']:.3f} bytes/param")
    print()
    rows = [[m["context"], human_bytes(m["kv_cache_fp16_bytes"])]
            + [human_bytes(m[f"total_{k}_bytes"]) for k in PRECISIONS] for m in r["memory"]]
    print(table(rows, ["context", "KV fp16"] + [f"total {k}" for k in PRECISIONS]))


def run(args) -> int:
    from ..loading import load_model

    model, _, folder = load_model(args.model, allow_pickle=args.allow_pickle, with_tokenizer=False)
    facts = describe(model)
    facts["checkpoint"] = checkpoint_facts(folder, facts["parameters"])
    emit(facts, args.json, render)
    return 0


def checkpoint_facts(folder, parameters: int) -> dict | None:
    """A quantized checkpoint's scheme and the bytes its weights file holds; None for other models."""
    import json
    from pathlib import Path

    from ..qformat import is_quantized_folder
    from ..schemes import get_scheme

    if not is_quantized_folder(folder):
        return None
    scheme = get_scheme(json.loads((Path(folder) / "quant.json").read_text())["scheme"])
    size = (Path(folder) / "model.safetensors").stat().st_size
    return {"scheme": scheme.name, "description": scheme.describe(), "weights_bytes": size,
            "bytes_per_param": size / parameters}
