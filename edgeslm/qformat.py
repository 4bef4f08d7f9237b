"""The one quantized checkpoint format, and the modules that run it.

A quantized checkpoint is a folder:
  config.json        the transformers config of the source model
  quant.json         {"format": "edgeslm-quant/1", "scheme": ..., "bits", "group_size", "symmetric",
                      "method", "quantized": [module names], "float": [tensor names kept float], ...}
  model.safetensors  for an int4 module M: M.qweight (uint8 [N, K/2]), M.scales (fp16 [N, K/G]),
                     M.zeros (uint8 [N, K/G], asymmetric only); for int8: M.qweight (int8 [N, K]),
                     M.scales (fp16 [N]); every other tensor float, under the decoder's own names
  tokenizer files

The int4 layout is documented in kernels/int4_matmul.py; every target maps these tensors, none
re-quantizes from float.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import ops
from .errors import EdgeSLMError
from .kernels.int4_matmul import dequantize_int4, pack_int4

FORMAT = "edgeslm-quant/1"


class Int4Linear(nn.Module):
    def __init__(self, in_features, out_features, group_size, symmetric, bias: bool):
        super().__init__()
        if in_features % group_size:
            raise EdgeSLMError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype=torch.float32):
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x):
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)


class Int8Linear(nn.Module):
    def __init__(self, in_features, out_features, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized(self, dtype=torch.float32):
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x):
        return ops.linear(x, self.dequantized(x.dtype), self.bias)


class Int4Embedding(Int4Linear):
    """An int4 table [V, H]; forward gathers rows, project is the tied lm_head over the same codes."""

    def __init__(self, vocab, dim, group_size, symmetric):
        super().__init__(dim, vocab, group_size, symmetric, bias=False)

    def forward(self, ids):
        z = None if self.zeros is None else self.zeros[ids.flatten()]
        rows = dequantize_int4(self.qweight[ids.flatten()], self.scales[ids.flatten()], z, self.group_size)
        return rows.view(*ids.shape, -1)

    def project(self, h):
        return ops.int4_linear(h, self.qweight, self.scales, self.zeros, self.group_size)


class Int8Embedding(Int8Linear):
    def __init__(self, vocab, dim):
        super().__init__(dim, vocab, bias=False)

    def forward(self, ids):
        rows = self.qweight[ids.flatten()].float() * self.scales[ids.flatten()].float()[:, None]
        return rows.view(*ids.shape, -1)

    def project(self, h):
        return super().forward(h)


# ---------------------------------------------------------------- round-to-nearest grids


def scale_grid(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp16 values that bf16 holds exactly too (8 significant bits).

    XNNPACK (the ExecuTorch target) stores blockwise int4 scales as bf16, every other runtime as
    fp16 or wider: on this grid all of them multiply the codes by the same numbers, so the int4
    weights are bit-identical everywhere. (A bf16 value under 2**-17 may round once more to an
    fp16 subnormal, which then has at most 8 significant bits: still exact in bf16.) An all-zero
    group gets the smallest fp16 scale, not 0, which XNNPACK rejects at load."""
    return scale.float().to(torch.bfloat16).to(torch.float16).clamp_min(2**-24)


def int4_grid_rtn(w: torch.Tensor, group_size: int, symmetric: bool):
    """Float [N, K] -> (codes uint8 [N, K], scales fp16 [N, K/G], zeros uint8 [N, K/G] | None).

    Symmetric: codes = round(w / s) + 8 with s = max|w| / 7.5 over the group, so both ends of the
    -8..7 range are used. Asymmetric: s = (max - min) / 15 and an integer zero point.
    """
    n, k = w.shape
    if k % group_size:
        raise EdgeSLMError(f"group size {group_size} does not divide K = {k}")
    g = w.float().view(n, k // group_size, group_size)
    if symmetric:
        scale = scale_grid(g.abs().amax(-1) / 7.5)
        codes = torch.round(g / scale.float()[..., None]).clamp(-8, 7) + 8
        zeros = None
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scale = scale_grid((hi - lo) / 15)
        zeros = torch.round(-lo / scale.float()).clamp(0, 15)
        codes = torch.round(g / scale.float()[..., None] + zeros[..., None]).clamp(0, 15)
        zeros = zeros.to(torch.uint8)
    return codes.view(n, k).to(torch.uint8), scale, zeros


def int8_grid_rtn(w: torch.Tensor):
    scale = (w.float().abs().amax(-1) / 127).clamp_min(1e-10).half()
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def fill_int4(module: Int4Linear, codes, scales, zeros):
    module.qweight.copy_(pack_int4(codes))
    module.scales.copy_(scales)
    if module.zeros is not None:
        module.zeros.copy_(zeros)


# ---------------------------------------------------------------- module swapping and checkpoint I/O


def linear_names(model) -> list[str]:
    """Every decoder linear (attention and MLP projections, and an untied lm_head)."""
    from .model import Linear

    return [name for name, m in model.named_modules() if isinstance(m, Linear)]


def quantized_module(old, scheme):
    """An empty quantized module for `scheme` in place of a float Linear or Embedding (bias kept)."""
    from .model import Embedding

    if isinstance(old, Embedding):
        vocab, dim = old.weight.shape
        return Int4Embedding(vocab, dim, scheme.group_size, scheme.symmetric) if scheme.bits == 4 else Int8Embedding(vocab, dim)
    if scheme.bits == 4:
        new = Int4Linear(old.in_features, old.out_features, scheme.group_size, scheme.symmetric, old.bias is not None)
    else:
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None)
    if old.bias is not None:
        new.bias = old.bias
    return new


def swap_modules(model, scheme) -> list[str]:
    """Replaces float modules by empty quantized ones for `scheme`; returns the swapped names."""
    from .model import Embedding

    names = linear_names(model) + (["embed_tokens"] if isinstance(model.embed_tokens, Embedding) else [])
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, quantized_module(getattr(parent, attr), scheme))
    return names


def map_int4_modules(model, linear_fn, embedding_fn):
    """Replaces each Int4Linear by linear_fn(module) and an Int4Embedding by embedding_fn(module),
    in place: how a target swaps in modules its exporter can trace, over the same tensors."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int4Embedding):
            parent, attr = _parent(model, name)
            setattr(parent, attr, embedding_fn(mod))
        elif isinstance(mod, Int4Linear):
            parent, attr = _parent(model, name)
            setattr(parent, attr, linear_fn(mod))
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
    quantized = [n for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))]
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


def load_quantized(folder: Path, dtype=torch.float32):
    """A quantized checkpoint folder -> Decoder with int4/int8 modules, ready to run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .loading import build_decoder, read_hf_config
    from .schemes import get_scheme

    folder = Path(folder)
    try:
        meta = json.loads((folder / "quant.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeSLMError(f"{folder / 'quant.json'} is not readable ({e})") from None
    if meta.get("format") != FORMAT:
        raise EdgeSLMError(f"{folder} is not an {FORMAT} checkpoint")
    scheme = get_scheme(meta["scheme"])
    model = build_decoder(read_hf_config(folder), None, dtype)
    swap_modules(model, scheme)
    try:
        state = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise EdgeSLMError(f"{folder / 'model.safetensors'} is not a valid safetensors file ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.json
        raise EdgeSLMError(f"{folder} does not fit its config: {str(e).strip().splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise EdgeSLMError(f"{folder} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in model.named_parameters():
        t.data = t.data.to(dtype)
    return model.eval(), scheme
