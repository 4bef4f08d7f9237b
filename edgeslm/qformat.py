"""The one quantized checkpoint format: module swapping and saving (loading.py reads it back).

A quantized checkpoint is a folder:
  config.json        the transformers config of the source model
  quant.json         {"format": "edgeslm-quant/1", "scheme": ..., "bits", "group_size", "symmetric",
                      "method", "quantized": [module names], "float": [tensor names kept float], ...}
  model.safetensors  for an int4 module M: M.qweight (uint8 [N, K/2]), M.scales (fp16 [N, K/G]),
                     M.zeros (uint8 [N, K/G], asymmetric only); for int8: M.qweight (int8 [N, K]),
                     M.scales (fp16 [N]); every other tensor float, under the decoder's own names
  tokenizer files

Each scheme's modules and layout live in its file under edgeslm/schemes/; every target maps these
tensors, none re-quantizes from float.
"""

from __future__ import annotations

import json
from pathlib import Path

from .model import Embedding, linear_names
from .schemes.base import QuantizedEmbedding, QuantizedLinear

FORMAT = "edgeslm-quant/1"


def quantized_module(old, scheme):
    """An empty quantized module for `scheme` in place of a float Linear or Embedding (bias kept)."""
    if isinstance(old, Embedding):
        return scheme.embedding_module(*old.weight.shape)
    new = scheme.linear_module(old.in_features, old.out_features, old.bias is not None)
    if old.bias is not None:
        new.bias = old.bias
    return new


def swap_modules(model, scheme) -> list[str]:
    """Replaces float modules by empty quantized ones for `scheme`; returns the swapped names."""
    names = linear_names(model) + (["embed_tokens"] if isinstance(model.embed_tokens, Embedding) else [])
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, quantized_module(getattr(parent, attr), scheme))
    return names


def map_quantized_modules(model, linear_fn, embedding_fn):
    """Replaces each quantized linear by linear_fn(module) and a quantized embedding by
    embedding_fn(module), in place: how a target swaps in modules its exporter can trace, over the
    same tensors."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear):
            parent, attr = _parent(model, name)
            setattr(parent, attr, embedding_fn(mod) if isinstance(mod, QuantizedEmbedding) else linear_fn(mod))
    return model


def _parent(model, dotted: str):
    *path, attr = dotted.split(".")
    parent = model
    for p in path:
        parent = getattr(parent, p)
    return parent, attr


def save_quantized(model, scheme, out: Path, tokenizer=None, extra: dict | None = None):
    """Writes the checkpoint folder (the caller makes `out` atomic: see artifact.atomic_folder)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    save_file(state, out / "model.safetensors", metadata={"format": FORMAT, "scheme": scheme.name})
    (out / "config.json").write_text(json.dumps(model.hf_config.to_dict(), indent=2))
    meta = {
        "format": FORMAT,
        "scheme": scheme.name,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "symmetric": scheme.symmetric,
        "method": scheme.method,
        "quantized": quantized,
        "float": sorted(k for k, v in state.items() if v.is_floating_point() and not k.endswith("scales")),
        **(extra or {}),
    }
    (out / "quant.json").write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def is_quantized_folder(folder: Path) -> bool:
    return (Path(folder) / "quant.json").is_file()
