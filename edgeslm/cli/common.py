"""Arguments and output shared by the verbs."""

from __future__ import annotations

import json
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
