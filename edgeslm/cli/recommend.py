"""edgeslm recommend: the models, schemes and targets that fit a task on a device (ESTIMATED figures)."""

from __future__ import annotations

import json
import sys

from ..errors import EdgeSLMError
from .common import add_json_argument, human_bytes, table

HELP = ("rank every (model, scheme, target) of the candidates file for a task on a device: weight and KV-cache "
        "bytes, ESTIMATED TTFT and decode tok/s (the roofline of `check`), and why the others do not fit")


def add_arguments(p):
    p.add_argument("--task", required=True,
                   help="general_chat, code, math, korean, rag or summarization (the candidates file's [task.*])")
    p.add_argument("--device", required=True,
                   help="a device profile name (host, pixel-8, iphone-15-pro, ...) or a path to a profile .toml")
    p.add_argument("--budget", metavar="FILE",
                   help="TOML overriding the profile's budgets: top-level ttft_ms, decode_tok_s, peak_memory_mb, "
                        "artifact_mb, prompt_tokens and context (tokens the KV cache holds), and [device.NAME] tables")
    p.add_argument("--context", type=int, default=None,
                   help="tokens the KV cache holds (default: the budget file's context, else 2048)")
    p.add_argument("--candidates", metavar="FILE", default=None,
                   help="a candidates file of the form of edgeslm/candidates.toml (default: that file)")
    p.add_argument("--profiles", action="append", default=[], metavar="DIR", help="extra device profile folder")
    p.add_argument("--all", action="store_true", help="list every misfit, not only one line per model")
    add_json_argument(p)


def run(args) -> int:
    from ..recommend import nothing_fits_message, recommend

    result = recommend(args.task, args.device, budget_file=args.budget, context=args.context,
                       candidates_file=args.candidates, profile_dirs=args.profiles)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(result, show_all=args.all)
    if not result["ranked"]:
        raise EdgeSLMError(nothing_fits_message(result))
    return 0


def render(r: dict, show_all: bool = False):
    b = r["budgets"]
    print(f"{r['task']} ({r['task_description']}) on {r['device_display']}: context {r['context']}, prompt "
          f"{r['prompt_tokens']} tokens; budgets: TTFT <= {b['ttft_ms']:g} ms, decode >= {b['decode_tok_s']:g} tok/s, "
          f"peak <= {b['peak_memory_mb']:g} MB, artifact <= {b['artifact_mb']:g} MB")
    print(f"picks for {r['task']}: " + ", ".join(f"{k} {v}" for k, v in r["picks"].items()))
    print(f"speeds are ESTIMATED: {r['basis']}")
    print()
    rows = [[x["rank"], x["model"], x["scheme"], x["target"], human_bytes(x["weight_bytes"]),
             f"{human_bytes(x['kv_cache_bytes'])} {x['kv_dtype']}", f"{x['estimated']['ttft_ms']:.0f}",
             f"{x['estimated']['decode_tok_s']:.1f}", x["pick"] or "", x["licence"]] for x in r["ranked"]]
    if rows:
        print(table(rows, ["#", "model", "scheme", "target", "weights", "KV cache", "TTFT ms (EST.)",
                           "decode tok/s (EST.)", "pick", "licence"]))
    else:
        print("nothing fits")
    print()
    print("does not fit:")
    suited = {x["model"] for x in r["ranked"] + r["misfits"] if x["task_rank"] is not None}
    unsuited = sorted({x["model"] for x in r["misfits"]} - suited)
    if unsuited and not show_all:
        print(f"  not suited to {r['task']}: {', '.join(unsuited)} ({r['task_basis']})")
    seen = set(unsuited) if not show_all else set()
    for x in r["misfits"]:
        if not show_all and x["model"] in seen:
            continue
        seen.add(x["model"])
        head = x["model"] if not show_all else f"{x['model']} {x['scheme']}/{x['target']}"
        if not show_all:
            fitting = {(y["scheme"], y["target"]) for y in r["ranked"] if y["model"] == x["model"]}
            if fitting:
                head += f" (other schemes/targets fit: {len(fitting)})"
            # the nearest misfit of this model: expressible by its target, then the fewest reasons
            x = min((y for y in r["misfits"] if y["model"] == x["model"]),
                    key=lambda y: (bool(y["blocking"]), len(y["reasons"]), y["memory_bytes"]))
            head += f", e.g. {x['scheme']}/{x['target']}"
        print(f"  {head}: {'; '.join(x['reasons'])}")
