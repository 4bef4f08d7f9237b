"""Quantize once: a float Decoder -> the packed format of qformat.py, by RTN (GPTQ and AWQ: see
the quantization issue; they produce the same codes/scales/zeros tensors)."""

from __future__ import annotations

import torch

from .errors import EdgeSLMError
from .qformat import fill_int4, int4_grid_rtn, int8_grid_rtn, linear_names, swap_modules


@torch.no_grad()
def quantize_model(model, scheme, calibration: torch.Tensor | None = None, progress: bool = True):
    """In place: float linears and embedding -> int4/int8 modules holding the scheme's grid."""
    if not scheme.quantized:
        return model.to(getattr(torch, scheme.float_dtype))
    if scheme.method not in ("rtn",):
        raise EdgeSLMError(f"{scheme.name}: the {scheme.method} quantizer is not available yet")
    floats = {name: model.get_submodule(name).weight.detach().float().clone() for name in linear_names(model)}
    embedding = model.embed_tokens.weight.detach().float().clone()
    swap_modules(model, scheme)
    for name, w in floats.items():
        _fill(model.get_submodule(name), w, scheme)
    _fill(model.embed_tokens, embedding, scheme)
    return model


def _fill(module, w, scheme):
    if scheme.bits == 4:
        fill_int4(module, *int4_grid_rtn(w, scheme.group_size, scheme.symmetric))
    else:
        q, s = int8_grid_rtn(w)
        module.qweight.copy_(q)
        module.scales.copy_(s)





def reference_folder(model_name, scheme, calibration_source: str = "brown:train", progress: bool = True):
    """The folder every target exports from and verify compares against, for (model, scheme).

    A float scheme uses the model folder itself. A quantized scheme is computed once into
    <cache>/quantized/<model>-<digest>-<scheme>/ (quantize once: every target reads these tensors).
    A folder that already is a quantized checkpoint is used as it is.
    """
    import hashlib
    import json

    from .artifact import atomic_folder
    from .loading import cache_dir, load_model, resolve_model_path
    from .qformat import is_quantized_folder, save_quantized

    folder = resolve_model_path(model_name)
    if is_quantized_folder(folder):
        have = json.loads((folder / "quant.json").read_text())["scheme"]
        if scheme.name != have:
            raise EdgeSLMError(f"{folder} is already quantized as {have}; it cannot be exported as {scheme.name}")
        return folder
    if not scheme.quantized:
        return folder
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(calibration_source.encode())
    target = cache_dir() / "quantized" / f"{folder.name}-{h.hexdigest()[:12]}-{scheme.name}"
    if (target / "quant.json").is_file():
        return target
    model, tok, _ = load_model(folder)
    calibration = None
    if scheme.needs_calibration:
        from .data import load_eval_text
        from .evaluate import eval_tokens

        calibration = eval_tokens(tok, load_eval_text(calibration_source), 128 * 512).view(128, 512)
    quantize_model(model, scheme, calibration, progress=progress)
    with atomic_folder(target, force=True) as tmp:
        save_quantized(model, scheme, tmp, tok, extra={"source": str(folder), "calibration": calibration_source})
    return target
