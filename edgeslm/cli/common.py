"""Arguments and output shared by the verbs."""

from __future__ import annotations

import json
import sys

from ..console import human_bytes, table  # noqa: F401  (the verbs' output helpers)

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def add_model_argument(parser, required: bool = False):
    parser.add_argument(
        "model",
        nargs=None if required else "?",
        default=None,
        help="a Hugging Face folder (config.json + safetensors), a .gguf file, or 'smollm2-135m' "
        "(the embedded default, used when omitted)",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="allow *.bin pickle checkpoints (unsafe)")


def add_json_argument(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def emit(result: dict, as_json: bool, render) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(result)
