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
    p.add_argument("--context", type=int, default=None,
                   help="static KV-cache length (default 512, or twice the sliding window when that is larger)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="tokens per prefill call (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="greedy steps of the final verify (default 64; with sliding windows the prompt "
                        "itself is longer than the window)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity run at the end (the manifest then says so)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 4), default=None,
                   help="onnx only: MatMulNBits' accuracy_level, 0 (exact, fp32 products) or 4 (int8 activations, "
                        "bounds derived from that arithmetic); default: the target's (see README)")
    p.add_argument("--allow-pickle", action="store_true", help="allow *.bin pickle checkpoints (unsafe)")
    add_json_argument(p)


def run(args) -> int:
    from ..errors import EdgeSLMError
    from ..exporter import export_artifact
    from ..parity import render

    options = {}
    if args.accuracy_level is not None:
        if args.target != "onnx":
            raise EdgeSLMError(f"--accuracy-level is an onnx setting; the {args.target} target has none")
        options["accuracy_level"] = args.accuracy_level
    manifest = export_artifact(args.model, args.target, args.scheme, Path(args.out), force=args.force,
                               context=args.context, prefill_chunk=args.prefill_chunk, steps=args.steps,
                               verify=not args.no_verify, progress=not args.json, allow_pickle=args.allow_pickle,
                               options=options)
    result = {"out": args.out, **{k: v for k, v in manifest.items() if k != "files"},
              "bytes": sum(f["bytes"] for f in manifest["files"].values())}

    def show(r):
        print(f"wrote {r['out']} ({r['target']}, {r['scheme']}, {r['bytes'] / 2**20:.1f} MiB)")
        if r.get("parity"):
            print(render(r["parity"]))

    emit(result, args.json, show)
    return 0
