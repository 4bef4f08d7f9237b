"""edgeslm quantize: a float model -> the one quantized checkpoint format (see qformat.py)."""

from __future__ import annotations

from ..schemes import CALIBRATION_LENGTH, CALIBRATION_SAMPLES, DEFAULT_CALIBRATION, DEFAULT_SCHEME, KNOWN, get_scheme
from .common import add_json_argument, add_model_argument, emit, human_bytes

HELP = "quantize a model once (int8, int4 RTN/GPTQ/AWQ) into a packed safetensors checkpoint"


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--scheme", default=DEFAULT_SCHEME,
                   help=f"one of: {KNOWN} (default %(default)s)")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help="GPTQ/AWQ calibration text: brown:train (default), brown:valid, or a .txt/.jsonl path")
    p.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES,
                   help=f"calibration windows of {CALIBRATION_LENGTH} tokens (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_argument(p)


def run(args) -> int:
    from ..quantizer import quantize_folder

    scheme = get_scheme(args.scheme)  # an unknown name fails before any loading
    if args.samples < 1:
        from ..errors import EdgeSLMError

        raise EdgeSLMError("--samples must be at least 1")
    facts = quantize_folder(args.model, scheme, args.out, args.calibration, args.samples,
                            progress=not args.no_progress, force=args.force, allow_pickle=args.allow_pickle)
    emit(facts, args.json, lambda r: print(
        f"{r['scheme']} ({r['description']}): {r['out']}\n"
        f"weights {human_bytes(r['weights_bytes'])} = {r['bytes_per_param']:.3f} bytes/param "
        f"over {r['parameters']:,} parameters; quantized in {r['seconds']} s"
        + (f" with {r['calibration_tokens']} calibration tokens of {r['calibration']}" if r["calibration"] else "")))
    return 0
