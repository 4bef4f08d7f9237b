"""edgeslm export: the quantized (or float) reference -> one target's artifact folder, verified."""

from __future__ import annotations

from pathlib import Path

from .common import add_json_argument, emit

HELP = "export a model to a target (onnx, executorch, ...) as a verified artifact folder with a manifest"


def add_arguments(p):
    p.add_argument("model", help="a Hugging Face folder, a .gguf file, a quantized checkpoint folder, or 'smollm2-135m'")
    p.add_argument("--target", required=True, help="target name (see targets/registry.py)")
    p.add_argument("--scheme", default="f32", help="quantization scheme, e.g. f32, q4g32-rtn (default %(default)s)")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--context", type=int, default=512, help="static KV-cache length (default %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="tokens per prefill call (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="greedy steps of the final verify (default max(64, 3x window))")
    p.add_argument("--no-verify", action="store_true", help="skip the parity run at the end (the manifest then says so)")
    p.add_argument("--allow-pickle", action="store_true", help="allow *.bin pickle checkpoints (unsafe)")
    add_json_argument(p)


def export_artifact(model_name, target_name: str, scheme_name: str, out: Path, force=False, context=512,
                    prefill_chunk=64, steps=None, verify=True, progress=True) -> dict:
    """The whole export; returns the manifest. Raises EdgeSLMError on bad input before writing anything."""
    import torch

    from ..artifact import atomic_folder, write_manifest
    from ..errors import CheckFailed, EdgeSLMError
    from ..loading import load_model, load_tokenizer
    from ..model import count_parameters
    from ..quantize import reference_folder
    from ..schemes import get_scheme
    from ..targets.base import ExportContext
    from ..targets.registry import get_target
    from ..verify import verify_folder

    target = get_target(target_name)
    scheme = get_scheme(scheme_name)
    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    if context < 16 or prefill_chunk < 1:
        raise EdgeSLMError("--context must be at least 16 and --prefill-chunk at least 1")
    reason = target.unavailable_reason()
    if reason:
        raise EdgeSLMError(f"target {target.name} is not available here: {reason}")
    ref = reference_folder(model_name, scheme, progress=progress)
    model, _, _ = load_model(ref, with_tokenizer=False)
    try:
        tok = load_tokenizer(ref)
    except EdgeSLMError:
        tok = None
    reason = target.unsupported_reason(model, scheme)
    if reason:
        raise EdgeSLMError(reason)
    parameters = count_parameters(model) + sum(b.numel() * (2 if b.dtype == torch.uint8 and "qweight" in n else 1)
                                               for n, b in model.named_buffers() if "qweight" in n)
    ctx = ExportContext(model_name=str(model_name), reference=str(ref.resolve()), context_length=context,
                        prefill_chunk=prefill_chunk, tokenizer=tok)
    with atomic_folder(out, force=force) as tmp:
        with torch.no_grad():
            fields = target.export(model, scheme, tmp, ctx)
        if tok is not None:
            tok.save_pretrained(str(tmp / "tokenizer"))
        base = {"model": str(model_name), "scheme": scheme.name, "target": target.name,
                "context_length": context, "reference": str(ref.resolve()), "parameters": parameters,
                "architecture": model.spec.family if hasattr(model.spec, "family") else None, **fields}
        manifest = write_manifest(tmp, base)
        if verify:
            result = verify_folder(tmp, steps=steps, progress=progress, manifest=manifest, raise_on_failure=False)
            result["folder"] = str(out)
            base["parity"] = result
        else:
            base["parity"] = None
        manifest = write_manifest(tmp, base)
    if verify and not manifest["parity"]["passed"]:
        raise CheckFailed(f"wrote {out}, but it fails its parity bounds: " + "; ".join(manifest["parity"]["failures"]))
    return manifest


def run(args) -> int:
    from ..verify import render

    manifest = export_artifact(args.model, args.target, args.scheme, Path(args.out), args.force, args.context,
                               args.prefill_chunk, args.steps, not args.no_verify, progress=not args.json)
    result = {"out": args.out, **{k: v for k, v in manifest.items() if k != "files"},
              "bytes": sum(f["bytes"] for f in manifest["files"].values())}

    def show(r):
        print(f"wrote {r['out']} ({r['target']}, {r['scheme']}, {r['bytes'] / 2**20:.1f} MiB)")
        if r.get("parity"):
            print(render(r["parity"]))

    emit(result, args.json, show)
    return 0
