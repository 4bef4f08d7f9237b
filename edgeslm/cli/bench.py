"""edgeslm bench: the measurements of `check`, without budgets, swept over prompt length and batch."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeSLMError
from ..latency import figures_for
from ..api import check_counts, open_artifacts
from .check import add_common_arguments, fmt
from .common import add_json_argument, emit, table

HELP = "time artifacts on devices over a sweep of prompt lengths and batch sizes (no budgets)"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgeSLMError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise EdgeSLMError(f"expected positive whole numbers, got {text!r}")
    return values


def add_arguments(p):
    p.add_argument("artifacts", nargs="+", metavar="DIR", help="artifact folders written by `edgeslm export`")
    p.add_argument("--device", action="append", metavar="NAME",
                   help="device profile name or .toml path (default: host); repeat for several")
    p.add_argument("--contexts", default="128", metavar="N,N,...",
                   help="prompt lengths to sweep: TTFT at each, then decode over that context (default 128)")
    p.add_argument("--batch", default="1", metavar="N,N,...",
                   help="batch sizes to sweep (default 1); measured runners are batch 1 (static KV cache), so "
                        "larger batches are roofline estimates")
    p.add_argument("--estimate", action="store_true",
                   help="also print the roofline estimate next to measured figures (labelled, never mixed)")
    add_common_arguments(p)
    add_json_argument(p)


def run(args) -> int:
    from tqdm import tqdm

    from ..devices import artifact_facts, estimate, get_profile

    check_counts(args.decode_tokens, args.runs, args.warmup)
    contexts, batches = int_list(args.contexts), int_list(args.batch)
    profiles = [get_profile(name, args.profiles) for name in (args.device or ["host"])]
    artifacts = open_artifacts(args.artifacts)
    for folder, manifest in artifacts:
        limit = int(manifest.get("context_length", 0) or 0)
        too_long = [c for c in contexts if limit and c + args.decode_tokens > limit]
        if too_long:
            raise EdgeSLMError(f"{folder}: a prompt of {too_long[0]} + {args.decode_tokens} decode tokens exceeds the "
                               f"artifact's context length {limit}")

    sweep = [(a, p, c, b) for a in artifacts for p in profiles for c in contexts for b in batches]
    results = []
    for (folder, manifest), profile, ctx, batch in tqdm(sweep, desc="bench", unit="point"):
        found = figures_for(folder, manifest, profile, ctx, args.decode_tokens, args.runs, args.warmup, batch)
        if args.estimate and any(r["measured"] for r in found) and manifest["target"] in profile.targets:
            est = estimate(profile, artifact_facts(folder, manifest), ctx, args.decode_tokens, batch)
            found.append({"runner": "estimated (roofline)", "measured": False, "basis": est["basis"],
                          "figures": {k: {"value": est[k]} for k in ("ttft_ms", "decode_tok_s", "peak_memory_mb",
                                                                     "artifact_mb")}})
        for r in found:
            results.append({"artifact": str(folder), "target": manifest["target"], "device": profile.name,
                            "prompt_tokens": ctx, "batch": batch, "decode_tokens": args.decode_tokens,
                            "runs": args.runs if r["measured"] else None, **r})
    emit({"results": results}, args.json, render)
    return 0


def render(r: dict):
    rows = []
    for res in r["results"]:
        f = res["figures"]
        label = f"measured: {res['runner']}" if res["measured"] else "ESTIMATED: roofline"
        if res.get("error"):
            rows.append([Path(res["artifact"]).name, res["device"], label, res["prompt_tokens"], res["batch"],
                         res["error"], "", "", "", ""])
            continue

        def cell(key):
            x = f.get(key, {})
            return fmt(x.get("median", x.get("value")))

        def p90(key):
            return fmt(f.get(key, {}).get("p90"))

        rows.append([Path(res["artifact"]).name, res["device"], label, res["prompt_tokens"], res["batch"],
                     cell("ttft_ms"), p90("ttft_ms"), cell("decode_tok_s"), p90("decode_tok_s"),
                     cell("peak_memory_mb")])
    print(table(rows, ["artifact", "device", "runner", "prompt", "batch", "TTFT ms", "p90", "decode tok/s", "p90",
                       "peak MB"]))
    print("\nMeasured: median and p90 (slow tail) over the runs. Estimated: roofline ceiling on speed, floor on "
          "memory (weights + KV cache).")
