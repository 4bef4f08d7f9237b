"""edgeslm check: does each artifact meet each device's budgets? Exit 0 all pass, 1 a budget fails, 2 bad input."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckFailed, EdgeSLMError
from .common import add_json_argument, emit, table

HELP = ("time each artifact on each device (measured where a runner reaches it, else a labelled roofline "
        "estimate) and compare with the device's budgets")


def add_arguments(p):
    p.add_argument("artifacts", nargs="+", metavar="DIR", help="artifact folders written by `edgeslm export`")
    p.add_argument("--device", action="append", required=True, metavar="NAME",
                   help="a device profile name (host, browser, pixel-8, galaxy-s24, oneplus-12, iphone-15-pro, "
                        "macbook-m2, android-midrange-6gb) or a path to a profile .toml; repeat for several")
    p.add_argument("--budget", metavar="FILE", help="a TOML budget file overriding the profiles' defaults: "
                   "top-level keys (ttft_ms, decode_tok_s, peak_memory_mb, artifact_mb, prompt_tokens) for every "
                   "device, [device.NAME] tables for one")
    add_common_arguments(p)
    add_json_argument(p)


def add_common_arguments(p):
    p.add_argument("--profiles", action="append", default=[], metavar="DIR",
                   help="a folder of extra device profiles (*.toml); $EDGESLM_DEVICES works too")
    p.add_argument("--decode-tokens", type=int, default=32, metavar="N", help="greedy tokens per run (default 32)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")


def check_counts(args):
    if args.decode_tokens < 2:
        raise EdgeSLMError("--decode-tokens must be at least 2 (one prefill token + one decode step)")
    if args.runs < 1 or args.warmup < 0:
        raise EdgeSLMError("--runs must be >= 1 and --warmup >= 0")


def open_artifacts(dirs) -> list[tuple[Path, dict]]:
    from ..artifact import read_manifest, require_hashes

    out = []
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise EdgeSLMError(f"{folder} is not a folder")
        manifest = read_manifest(folder)
        if "target" not in manifest:
            raise EdgeSLMError(f"{folder}/manifest.json does not name its target")
        require_hashes(folder, manifest)
        out.append((folder, manifest))
    return out


def run(args) -> int:
    from tqdm import tqdm

    from ..devices import budgets_for, get_profile, load_budget_file
    from ..latency import figures_for, judge

    check_counts(args)
    # every input is validated before anything is timed
    profiles = [get_profile(name, args.profiles) for name in args.device]
    overrides = load_budget_file(args.budget) if args.budget else None
    artifacts = open_artifacts(args.artifacts)

    results = []
    pairs = [(a, p) for a in artifacts for p in profiles]
    for (folder, manifest), profile in tqdm(pairs, desc="check", unit="pair", disable=len(pairs) < 2 and args.json):
        budgets = budgets_for(profile, overrides)
        prompt = int(budgets["prompt_tokens"])
        for r in figures_for(folder, manifest, profile, prompt, args.decode_tokens, args.runs, args.warmup):
            results.append({"artifact": str(folder), "target": manifest["target"], "device": profile.name,
                            "device_kind": profile.kind, "prompt_tokens": prompt, "decode_tokens": args.decode_tokens,
                            "runs": args.runs if r["measured"] else None, **r, "checks": judge(r, budgets)})
    passed = all(c["pass"] for r in results for c in r["checks"])
    emit({"passed": passed, "results": results}, args.json, render)
    if not passed:
        failed = [f"{Path(r['artifact']).name}@{r['device']}:{c['figure']}" for r in results for c in r["checks"]
                  if not c["pass"]]
        raise CheckFailed(f"{len(failed)} budget check(s) failed: {', '.join(failed[:6])}")
    return 0


def fmt(value, unit=""):
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def render(r: dict):
    rows = []
    for res in r["results"]:
        label = f"measured: {res['runner']}" if res["measured"] else "ESTIMATED: roofline"
        for c in res["checks"]:
            if c["figure"] == "runs":
                rows.append([Path(res["artifact"]).name, res["device"], label, "-", "-", "-", "-", "FAIL: " + c["why"]])
                continue
            sign = "<=" if c["direction"] == "max" else ">="
            rows.append([Path(res["artifact"]).name, res["device"], label, f"{c['figure']}",
                         fmt(c["value"]), fmt(c["p90"]), f"{sign} {fmt(c['budget'])}", "pass" if c["pass"] else "FAIL"])
    print(table(rows, ["artifact", "device", "runner", "figure", "median/value", "p90", "budget", "result"]))
    prompts = sorted({res["prompt_tokens"] for res in r["results"]})
    print(f"\nTTFT at a prompt of {', '.join(map(str, prompts))} tokens; decode over "
          f"{r['results'][0]['decode_tokens'] if r['results'] else 0} tokens. Measured figures are judged on their "
          "median (p90: the slow tail). Estimates are a roofline on the profile's peak bandwidth and compute: a "
          "ceiling on speed and a floor on memory, never a measurement.")
    for res in r["results"]:
        if res.get("note"):
            print(f"  {Path(res['artifact']).name} on {res['device']}: estimated because {res['note']}")
    print("all budgets pass" if r["passed"] else "some budgets FAIL")
