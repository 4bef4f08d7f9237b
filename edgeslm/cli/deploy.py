"""edgeslm deploy: the main job, from a recipe (or the defaults) to report.html."""

from __future__ import annotations

from pathlib import Path

from .common import add_json_argument, emit, table

HELP = ("the main job: model -> (fine-tune) -> quantize once -> export every target -> verify -> "
        "latency checks per device -> report.json + report.html")


def add_arguments(p):
    p.add_argument("recipe", nargs="?", help="a recipe TOML (see edgeslm/pipeline.py); default: the embedded "
                   "SmolLM2-135M, scheme q4g32-gptq, targets onnx + executorch (+ gguf when llama.cpp is built; "
                   "coreml and webgpu are opt-in), devices host, pixel-8, iphone-15-pro")
    p.add_argument("--out", required=True, help="output folder (reused: finished steps are cached)")
    p.add_argument("--scheme", help="override the recipe's scheme")
    p.add_argument("--target", action="append", dest="targets", metavar="NAME", help="override the recipe's targets")
    p.add_argument("--device", action="append", dest="devices", metavar="NAME", help="override the recipe's devices")
    add_json_argument(p)


def run(args) -> int:
    from ..errors import CheckFailed
    from ..pipeline import read_recipe, run_deploy

    recipe = read_recipe(args.recipe)
    for key in ("scheme", "targets", "devices"):
        if getattr(args, key):
            setattr(recipe, key, getattr(args, key))
    log = (lambda *a: None) if args.json else print
    report = run_deploy(recipe, Path(args.out), progress=not args.json, log=log)
    emit(report, args.json, lambda r: render(r, Path(args.out)))
    if not report["ok"]:
        raise CheckFailed(f"deploy finished with failures; see {Path(args.out) / 'report.html'}")
    return 0


def render(r: dict, out: Path):
    rows = []
    for t in r["targets"]:
        p = t.get("parity") or {}
        status = "skipped" if t.get("ok") is None else ("pass" if t["ok"] else "FAIL")
        ppl = f"{p['ppl_artifact']:.3f}" if p.get("ppl_artifact") else "-"
        size = f"{t['bytes'] / 2**20:.1f} MiB" if t.get("bytes") else "-"
        rows.append([t["target"], status, size, ppl, t.get("reason", "")[:80]])
    print(table(rows, ["target", "verify", "size", "perplexity", "note"]))
    failed = [c for c in r["checks"] if not c["ok"]]
    print(f"\n{len(r['checks'])} budget checks, {len(failed)} failed")
    for name, why in r["not_available"].items():
        print(f"not built here: {name}: {why}")
    print(f"\nwrote {out / 'report.json'} and {out / 'report.html'} in {r['timings']['total_s']:.0f} s")
