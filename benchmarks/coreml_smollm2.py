"""Core ML target on SmolLM2-135M, by hand (too slow for CI): export, time the Linux MIL executor,
then the shared verify (32 greedy steps, Brown perplexity on --ppl-tokens tokens).

    python benchmarks/coreml_smollm2.py --scheme f16 --out /tmp/smol_coreml_f16 --ppl-tokens 512
    python benchmarks/coreml_smollm2.py --scheme q4g32-rtn --out /tmp/smol_coreml_q4 --ppl-tokens 1024

--skip-export reuses an existing artifact folder. The executor is numpy (NOT Apple's Core ML
runtime): its speed says nothing about a device; it is reported so that verify times are known.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="f16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-export", action="store_true")
    args = ap.parse_args()

    from edgeslm.artifact import read_manifest
    from edgeslm.exporter import export_artifact
    from edgeslm.console import quiet_third_party_noise
    from edgeslm.targets.registry import get_target
    from edgeslm.parity import render, verify_folder

    quiet_third_party_noise()
    out = Path(args.out)
    result = {"scheme": args.scheme, "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads"}
    if not args.skip_export:
        t0 = time.perf_counter()
        export_artifact(None, "coreml", args.scheme, out, force=True, context=512, prefill_chunk=64, verify=False,
                        progress=True)
        result["export_s"] = round(time.perf_counter() - t0, 1)
    manifest = read_manifest(out)
    target = get_target("coreml")
    result["inspect"] = {k: v for k, v in target.inspect(out, manifest).items() if k != "float_weight_consts"}
    t0 = time.perf_counter()
    runner = target.load(out, manifest)
    result["executor_load_s"] = round(time.perf_counter() - t0, 1)
    ids = (torch.arange(64) * 7919 % 49152).view(1, -1)
    t0 = time.perf_counter()
    runner.prefill(ids, 0)
    result["executor_prefill64_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    runner.decode(5, 64)
    result["executor_decode_s"] = round(time.perf_counter() - t0, 2)
    result["runtime"] = runner.runtime
    t0 = time.perf_counter()
    r = verify_folder(out, steps=args.steps, ppl_count=args.ppl_tokens, progress=True, raise_on_failure=False)
    result["verify_s"] = round(time.perf_counter() - t0, 1)
    print(render(r))
    result["verify"] = {k: v for k, v in r.items() if k not in ("bounds",)}
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
