"""edgeslm check: does each artifact meet each device's budgets? Exit 0 all pass, 1 a budget fails, 2 bad input."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckFailed, EdgeSLMError
from .common import add_json_argument, emit, table

HELP = ("time each artifact on each device (measured where a runner reaches it, else a labelled roofline "
        "estimate) and compare with the device's budgets; exit 0 only when every figure was measured and passed "
        "(or has no budget), unless --allow-estimates")


def add_arguments(p):
    p.add_argument("artifacts", nargs="+", metavar="DIR", help="artifact folders written by `edgeslm export`")
    p.add_argument("--device", action="append", required=True, metavar="NAME",
                   help="a device profile name (host, browser, pixel-8, galaxy-s24, oneplus-12, iphone-15-pro, "
                        "macbook-m2, android-midrange-6gb) or a path to a profile .toml; repeat for several")
    p.add_argument("--budget", metavar="FILE", help="a TOML budget file overriding the profiles' defaults: "
                   "top-level keys (ttft_ms, decode_tok_s, peak_memory_mb, artifact_mb, prompt_tokens) for every "
                   "device, [device.NAME] tables for one")
    p.add_argument("--allow-estimates", action="store_true",
                   help="let a roofline estimate within its budget (UNVERIFIED) count toward exit 0")
    add_common_arguments(p)
    add_json_argument(p)


def add_common_arguments(p):
    p.add_argument("--profiles", action="append", default=[], metavar="DIR",
                   help="a folder of extra device profiles (*.toml); $EDGESLM_DEVICES works too")
    p.add_argument("--decode-tokens", type=int, default=32, metavar="N", help="greedy tokens per run (default 32)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")


def run(args) -> int:
    from ..api import check

    report = check(args.artifacts, devices=args.device, budget=args.budget, allow_estimates=args.allow_estimates,
                   profiles=args.profiles, decode_tokens=args.decode_tokens, runs=args.runs, warmup=args.warmup)
    emit(report.to_dict(), args.json, render)
    if not report.passed:
        results = report.results
        failed = [f"{Path(r['artifact']).name}@{r['device']}:{c['figure']}" for r in results for c in r["checks"]
                  if c["verdict"] == "fail"]
        unverified = sorted({f"{Path(r['artifact']).name}@{r['device']}" for r in results
                             if any(c["verdict"] == "unverified" for c in r["checks"])})
        why = []
        if failed:
            why.append(f"{len(failed)} budget check(s) failed: {', '.join(failed[:6])}")
        if unverified:
            why.append(f"{len(unverified)} pair(s) only estimated, not measured: {', '.join(unverified[:6])} "
                       "(--allow-estimates accepts estimates)")
        raise CheckFailed("; ".join(why))
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
            budget = f"{sign} {fmt(c['budget'])}" if c["budget"] is not None else "-"
            rows.append([Path(res["artifact"]).name, res["device"], label, f"{c['figure']}",
                         fmt(c["value"]), fmt(c["p90"]), budget, c["verdict"].upper()])
    print(table(rows, ["artifact", "device", "runner", "figure", "median/value", "p90", "budget", "result"]))
    prompts = sorted({res["prompt_tokens"] for res in r["results"]})
    print(f"\nTTFT at a prompt of {', '.join(map(str, prompts))} tokens; decode over "
          f"{r['results'][0]['decode_tokens'] if r['results'] else 0} tokens. Measured figures are judged on their "
          "median (p90: the slow tail). Estimates are a roofline on the profile's peak bandwidth and compute: a "
          "ceiling on speed and a floor on memory, never a measurement.")
    for res in r["results"]:
        if res.get("note"):
            print(f"  {Path(res['artifact']).name} on {res['device']}: estimated because {res['note']}")
    v = r["verdicts"]
    print(f"{v['pass']} PASS (measured), {v['fail']} FAIL, {v['unverified']} UNVERIFIED (estimate within budget), "
          f"{v['reported']} REPORTED (no budget)")
    print("check passed" if r["passed"] else "check FAILED" + ("" if v["fail"] or r["allow_estimates"] else
                                                             ": estimates are not measurements (--allow-estimates)"))
