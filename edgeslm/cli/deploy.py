"""edgeslm deploy: the main job. Until every step exists it runs what exists and says what is missing."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import load_eval_text
from ..evaluate import decoder_logits_fn, eval_tokens, perplexity
from ..loading import load_model
from ..targets.registry import TARGETS
from .common import add_json_argument, emit
from .info import describe

HELP = "the main job: model -> (fine-tune) -> quantize -> export -> verify -> check -> report"


def add_arguments(p):
    p.add_argument("recipe", nargs="?", help="a recipe TOML (default: the embedded SmolLM2-135M, every target)")
    p.add_argument("--out", required=True, help="output folder")
    add_json_argument(p)


def run(args) -> int:
    model, tok, folder = load_model(None)
    tokens = eval_tokens(tok, load_eval_text("brown:test"))
    result = {
        "model": str(folder),
        "info": describe(model),
        "reference_perplexity": perplexity(decoder_logits_fn(model), tokens),
        "targets": sorted(TARGETS),
        "not_yet": ["quantize", "export", "verify", "check", "report"] if not TARGETS else [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))

    def render(r):
        print(f"model: {r['model']} ({r['info']['parameters'] / 1e6:.1f}M parameters)")
        print(f"Brown test perplexity (reference decoder): {r['reference_perplexity']['perplexity']:.3f}")
        if r["not_yet"]:
            print("not there yet: " + ", ".join(r["not_yet"]))
        print(f"wrote {out / 'report.json'}")

    emit(result, args.json, render)
    return 0
