"""Prefill (TTFT) and decode tokens/s of exported artifacts through their Runners (Runner.measure_speed).

    python benchmarks/target_speed.py ART_DIR [ART_DIR ...] [--prompt 128] [--steps 64] [--json]

Each folder is an `edgeslm export` artifact; its target's Runner runs it in the target's own runtime
(onnxruntime, executorch.runtime, ...). Figures depend on the machine and its load: record them in
benchmarks/RESULTS.md with machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from edgeslm.artifact import read_manifest, require_hashes
    from edgeslm.targets.registry import get_target

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for TTFT (default %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed (default %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for folder in args.folders:
        manifest = read_manifest(Path(folder))
        require_hashes(Path(folder), manifest)
        runner = get_target(manifest["target"]).load(Path(folder), manifest)
        try:
            r = runner.measure_speed(args.prompt, args.steps)
        finally:
            runner.close()
        r.update(folder=folder, target=manifest["target"], scheme=manifest["scheme"], model=manifest["model"])
        rows.append(r)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "load_avg_1m": os.getloadavg()[0]}
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    print(f"machine: {meta['machine']}, 1-min load average at the end: {meta['load_avg_1m']:.1f}")
    for r in rows:
        print(f"{r['target']:<11} {r['scheme']:<10} TTFT {1000 * r['ttft_s']:7.1f} ms ({r['prefill_tok_s']:6.1f} tok/s "
              f"prefill, {r['prompt_tokens']} tokens)  decode {r['decode_tok_s']:6.1f} tok/s  [{r['runtime']}]")


if __name__ == "__main__":
    main()
