"""GPTQ's quality levers, each measured over calibration seeds: what edgeslm.quantizer.RECIPE keeps.

    python benchmarks/quality_levers.py [--configs baseline,emb-gptq,...] [--seeds 1,2,3] [--json]
                                        [--scheme q4g32-gptq] [--tokens 8192] [--out benchmarks/quality_levers]

Each config is a quantizer.Recipe plus a calibration size; the configs are cumulative (each adds one
lever to the one before it), so a lever's effect is the difference between neighbours:
  baseline      13 clip ratios for the group scales, the tied embedding by clip-searched RTN, every
                linear of a layer calibrated on the float layer's inputs, 8 x 512 calibration tokens
  emb-gptq      + GPTQ on the tied embedding / lm_head table with the final hidden states' Hessian
  grid          + the group scale searched over every bf16-exact value (0.55x..1.08x of full range)
  true-seq      + true-sequential: q/k/v, o, gate/up, down each calibrated on the quantized inputs
  emb-true-seq  emb-gptq + true-sequential, without the grid search (true-sequential alone)
  refine        emb-gptq + the scale search by 14 ratios then +-6 bf16-exact steps around each
                group's best (the dense grid's optimum at about a sixth of its cost)
  refine-true-seq  refine + true-sequential
  calib32       + 32 x 512 calibration tokens
  calib64       + 64 x 512 calibration tokens
  refine-calib32/64/128  refine with 32, 64 or 128 x 512 calibration tokens
  refine-awq    refine + AWQ's per-channel input scales searched and folded, then GPTQ
  refine-choice refine + per set of linears sharing an input, the grid with the least output error
                on the calibration inputs among RTN, GPTQ, AWQ+RTN and AWQ+GPTQ
  refine-awq-calib32  refine-awq with 32 x 512 calibration tokens
For every (config, seed): the float model is loaded, quantized in memory by quantize_model with
calibration_tokens(seed=seed) (that many windows drawn at random from Brown train), and scored on
the first --tokens Brown test tokens at context 512 (quality.py's tokens). Writes <out>.json / .md
after every run and skips runs already in <out>.json (same scheme and tokens), so it resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "baseline": (dict(scale_search="ratios", embedding="clip", true_sequential=False), 8),
    "emb-gptq": (dict(scale_search="ratios", embedding="gptq", true_sequential=False), 8),
    "grid": (dict(scale_search="grid", embedding="gptq", true_sequential=False), 8),
    "true-seq": (dict(scale_search="grid", embedding="gptq", true_sequential=True), 8),
    "emb-true-seq": (dict(scale_search="ratios", embedding="gptq", true_sequential=True), 8),
    "refine": (dict(scale_search="refine", embedding="gptq", true_sequential=False), 8),
    "refine-true-seq": (dict(scale_search="refine", embedding="gptq", true_sequential=True), 8),
    "calib32": (dict(scale_search="grid", embedding="gptq", true_sequential=True), 32),
    "calib64": (dict(scale_search="grid", embedding="gptq", true_sequential=True), 64),
    "refine-calib32": (dict(scale_search="refine", embedding="gptq", true_sequential=False), 32),
    "refine-calib64": (dict(scale_search="refine", embedding="gptq", true_sequential=False), 64),
    "refine-calib128": (dict(scale_search="refine", embedding="gptq", true_sequential=False), 128),
    "refine-awq": (dict(scale_search="refine", embedding="gptq", awq_scales=True), 8),
    "refine-choice": (dict(scale_search="refine", embedding="gptq", layer_choice=True), 8),
    "refine-awq-calib32": (dict(scale_search="refine", embedding="gptq", awq_scales=True), 32),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="baseline,emb-gptq,grid,true-seq")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--scheme", default="q4g32-gptq")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).with_name("quality_levers")))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--merge", default="", help="other runs' JSON files (same scheme and tokens) to add first: "
                    "configs run in parallel processes, each with its own --out")
    args = ap.parse_args(argv)

    from edgeslm.data import load_eval_text
    from edgeslm.evaluate import decoder_logits_fn, eval_tokens, perplexity
    from edgeslm.loading import load_model, load_tokenizer, resolve_model_path
    from edgeslm.quantizer import CALIBRATION_LENGTH, Recipe, calibration_tokens, quantize_model
    from edgeslm.schemes import get_scheme

    out = Path(args.out)
    folder = resolve_model_path(None)
    tok = load_tokenizer(folder)
    tokens = eval_tokens(tok, load_eval_text("brown:test"), args.tokens)
    scheme = get_scheme(args.scheme)
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    if report.get("scheme") != scheme.name or report.get("tokens") != args.tokens:
        report = {"scheme": scheme.name, "tokens": args.tokens, "context": args.context, "runs": []}
    for other in (Path(f) for f in args.merge.split(",") if f):
        extra = json.loads(other.read_text())
        if (extra["scheme"], extra["tokens"]) != (scheme.name, args.tokens):
            raise SystemExit(f"{other}: another scheme or token count")
        report.setdefault("f32", extra.get("f32"))
        have = {(r["config"], r["seed"]) for r in report["runs"]}
        report["runs"] += [r for r in extra["runs"] if (r["config"], r["seed"]) not in have]
    done = {(r["config"], r["seed"]) for r in report["runs"]}
    if "f32" not in report:
        model, _, _ = load_model(folder, with_tokenizer=False)
        report["f32"] = perplexity(decoder_logits_fn(model), tokens, args.context, progress=False)["perplexity"]
        save(report, out)
    configs = [c for c in args.configs.split(",") if c]
    for seed, name in ((int(s), c) for s in args.seeds.split(",") for c in configs):  # every config's first seed first
        fields, samples = CONFIGS[name]
        if (name, seed) in done:
            continue
        log(f"{name} seed {seed} ...")
        start = time.perf_counter()
        model, _, _ = load_model(folder, with_tokenizer=False)
        calibration = calibration_tokens(tok, samples=samples, length=CALIBRATION_LENGTH, seed=seed)
        quantize_model(model, scheme, calibration, progress=False, recipe=Recipe(**fields))
        seconds = time.perf_counter() - start
        ppl = perplexity(decoder_logits_fn(model), tokens, args.context, progress=False)["perplexity"]
        report["runs"].append({"config": name, "seed": seed, "recipe": fields, "calibration_windows": samples,
                               "perplexity": ppl, "change_pct": 100 * (ppl / report["f32"] - 1),
                               "quantize_seconds": round(seconds, 1),
                               "torch_threads": torch.get_num_threads()})
        log(f"  {ppl:.3f} ({100 * (ppl / report['f32'] - 1):+.2f}%), quantized in {seconds:.0f} s")
        save(report, out)
    save(report, out)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def save(report, out: Path):
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(summary(report) + "\n")


def summary(report) -> str:
    """One line per config: mean and spread (sample standard deviation, min..max) over its seeds."""
    lines = [f"{report['scheme']}, Brown test {report['tokens']:,} tokens; f32 {report.get('f32', float('nan')):.3f}",
             "", "| config | seeds | perplexity mean | change mean | change sd | change min..max | quantize s (mean) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    order = list(CONFIGS)
    configs = sorted({r["config"] for r in report["runs"]}, key=lambda c: order.index(c) if c in order else 99)
    for c in configs:
        runs = [r for r in report["runs"] if r["config"] == c]
        ch = [r["change_pct"] for r in runs]
        sd = statistics.stdev(ch) if len(ch) > 1 else float("nan")
        lines.append(f"| {c} | {','.join(str(r['seed']) for r in runs)} | "
                     f"{statistics.mean(r['perplexity'] for r in runs):.3f} | {statistics.mean(ch):+.2f}% | "
                     f"{sd:.2f} | {min(ch):+.2f}..{max(ch):+.2f}% | "
                     f"{statistics.mean(r['quantize_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
