"""The whole export of one target: reference checkpoint -> artifact folder + manifest, verified.

Used by `edgeslm export`, `edgeslm deploy` and the target tests; bad input raises EdgeSLMError
before anything is written, and the folder appears only when complete (artifact.atomic_folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def export_artifact(model_name, target_name: str, scheme_name: str, out: Path, force=False, context=None,
                    prefill_chunk=64, steps=None, verify=True, progress=True, allow_pickle=False,
                    options: dict | None = None) -> dict:
    """The whole export; returns the manifest. Raises EdgeSLMError on bad input before writing anything.

    context None: parity.default_context (512, or 2x the sliding window so verify can cross it).
    options: target-specific settings (ExportContext.options), e.g. {"accuracy_level": 4} for onnx."""
    import torch

    from .artifact import atomic_folder, write_manifest
    from .errors import CheckFailed, EdgeSLMError
    from .config import spec_from_hf_config
    from .loading import load_model, load_tokenizer, read_hf_config, resolve_model_path
    from .model import count_parameters
    from .quantizer import reference_folder
    from .schemes import get_scheme
    from .targets.base import ExportContext
    from .targets.registry import get_target
    from .parity import default_context, plan, verify_folder

    target = get_target(target_name)
    scheme = get_scheme(scheme_name)
    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise EdgeSLMError(f"cannot write {out}: {out.parent} is not a folder")
    reason = target.unavailable_reason()
    if reason:
        raise EdgeSLMError(f"target {target.name} is not available here: {reason}")
    # settings that cannot work are refused from the config alone, before quantizing or exporting
    spec = spec_from_hf_config(read_hf_config(resolve_model_path(model_name)))
    context = default_context(spec, context)
    if context < 16 or prefill_chunk < 1:
        raise EdgeSLMError("--context must be at least 16 and --prefill-chunk at least 1")
    if verify:
        plan(spec, context, steps)
    ref = reference_folder(model_name, scheme, progress=progress, allow_pickle=allow_pickle)
    model, _, _ = load_model(ref, with_tokenizer=False, allow_pickle=allow_pickle)
    try:
        tok = load_tokenizer(ref)
    except EdgeSLMError:
        tok = None
    reason = target.unsupported_reason(model, scheme)
    if reason:
        raise EdgeSLMError(reason)
    parameters = count_parameters(model)
    ctx = ExportContext(model_name=str(model_name), reference=str(ref.resolve()), context_length=context,
                        prefill_chunk=prefill_chunk, tokenizer=tok, options=dict(options or {}))
    with atomic_folder(out, force=force) as tmp:
        with torch.no_grad():
            fields = target.export(model, scheme, tmp, ctx)
        if tok is not None and not (tmp / "tokenizer.json").is_file():  # a target may ship it at the top already
            tok.save_pretrained(str(tmp / "tokenizer"))
        # the model's config travels with the artifact, so a copied folder needs no cache to be described
        shutil.copyfile(Path(ref) / "config.json", tmp / "config.json")
        base = {"model": str(model_name), "scheme": scheme.name, "target": target.name,
                "context_length": context, "reference": str(ref.resolve()), "parameters": parameters,
                "architecture": model.spec.family if hasattr(model.spec, "family") else None, **fields}
        manifest = write_manifest(tmp, base)
        if verify:
            result = verify_folder(tmp, steps=steps, progress=progress, manifest=manifest, raise_on_failure=False,
                                   allow_pickle=allow_pickle)
            result["folder"] = str(out)
            base["parity"] = result
        else:
            base["parity"] = None
        manifest = write_manifest(tmp, base)
    if verify and not manifest["parity"]["passed"]:
        raise CheckFailed(f"wrote {out}, but it fails its parity bounds: " + "; ".join(manifest["parity"]["failures"]))
    return manifest
