"""edgeslm deploy: the main job, from a recipe (or the defaults) to report.html."""

from __future__ import annotations

from pathlib import Path

from .common import add_json_argument, emit, table

HELP = ("the main job: model -> (fine-tune) -> quantize once -> export every target -> verify -> "
        "latency checks per device -> report.json + report.html")


def add_arguments(p):
    p.add_argument("recipe", nargs="?", help="a recipe TOML (see edgeslm/pipeline.py); default: the embedded "
                   "SmolLM2-135M, scheme q4g32-gptq, target onnx (+ gguf when llama.cpp is built; "
                   "executorch, coreml and webgpu are opt-in), device host")
    p.add_argument("--out", required=True, help="output folder (reused: finished steps are cached)")
    p.add_argument("--scheme", help="override the recipe's scheme")
    p.add_argument("--target", action="append", dest="targets", metavar="NAME", help="override the recipe's targets")
    p.add_argument("--device", action="append", dest="devices", metavar="NAME", help="override the recipe's devices")
    p.add_argument("--allow-estimates", action="store_true", default=None,
                   help="let roofline estimates within budget (UNVERIFIED) count toward exit 0, for devices no "
                        "runner reaches")
    add_json_argument(p)


def run(args) -> int:
    from ..errors import CheckFailed
    from ..pipeline import read_recipe, run_deploy

    recipe = read_recipe(args.recipe)
    for key in ("scheme", "targets", "devices", "allow_estimates"):
        if getattr(args, key):
            setattr(recipe, key, getattr(args, key))
    report = run_deploy(recipe, Path(args.out), progress=True)
    emit(report, args.json, lambda r: render(r, Path(args.out)))
    if not report["ok"]:
        failed = [t["target"] for t in report["targets"] if t["verdict"] != "pass"]
        v = report["verdicts"]
        why = ([f"target(s) failed: {', '.join(failed)}"] if failed else []) + (
            [f"{v['fail']} budget check(s) failed"] if v["fail"] else []) + (
            [f"{v['unverified']} figure(s) only estimated (--allow-estimates accepts them)"]
            if v["unverified"] and not report["allow_estimates"] else [])
        raise CheckFailed(f"deploy: {'; '.join(why) or 'no target built'}; see {Path(args.out) / 'report.html'}")
    return 0


def render(r: dict, out: Path):
    rows = []
    for t in r["targets"]:
        p = t.get("parity") or {}
        status = t["verdict"].upper()
        ppl = f"{p['ppl_artifact']:.3f}" if p.get("ppl_artifact") else "-"
        size = f"{t['bytes'] / 2**20:.1f} MiB" if t.get("bytes") else "-"
        rows.append([t["target"], status, size, ppl, t.get("reason", "")[:80]])
    print(table(rows, ["target", "verify", "size", "perplexity", "note"]))
    v = r["verdicts"]
    print(f"\n{len(r['checks'])} figures: {v['pass']} PASS, {v['fail']} FAIL, {v['unverified']} UNVERIFIED (estimated), "
          f"{v['reported']} REPORTED (no budget)")
    for name, why in r["not_available"].items():
        print(f"not built here: {name}: {why}")
    print(f"\nwrote {out / 'report.json'} and {out / 'report.html'} in {r['timings']['total_s']:.0f} s")
