"""An edgeslm artifact in its own runtime, driven over a pipe (run by the main .venv's Python).

Same protocol as targets/gguf_worker.py and benchmarks/genai_worker.py. The artifact is opened the
way `edgeslm verify` opens it: Target.load(folder, manifest) -> Runner.
Usage: edgeslm_worker.py ARTIFACT_FOLDER [THREADS]
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time


def peak_rss_mb() -> float:
    """VmHWM of this process: ru_maxrss would also count the parent's pages at fork (Linux keeps it across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    threads = sys.argv[2] if len(sys.argv) > 2 else "2"
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    import torch

    torch.set_num_threads(int(threads))
    from edgeslm.artifact import read_manifest
    from edgeslm.targets.registry import get_target

    rss_base = peak_rss_mb()
    folder = sys.argv[1]
    manifest = read_manifest(folder)
    runner = get_target(manifest["target"]).load(folder, manifest)

    def answer(header):
        sys.stdout.write(json.dumps(header) + "\n")
        sys.stdout.flush()

    answer({"ready": True, "runtime": runner.runtime})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "bench":
                prompt, steps = torch.tensor([req["prompt"]], dtype=torch.long), int(req["decode"])
                runner.reset()
                t0 = time.perf_counter()
                last = runner.prefill(prompt, 0)[0, -1]
                t1 = time.perf_counter()
                tokens = []
                for step in range(steps):
                    nxt = int(last.argmax())
                    tokens.append(nxt)
                    last = runner.decode(nxt, prompt.shape[1] + step)
                t2 = time.perf_counter()
                answer({"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens,
                        "peak_rss_mb": peak_rss_mb(),
                        "rss_before_load_mb": rss_base})
            elif req["op"] == "nll":
                ids = torch.tensor([req["tokens"]], dtype=torch.long)
                logits = runner.score(ids)[0, :-1].double()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                if not math.isfinite(nll):
                    raise RuntimeError("non-finite NLL")
                answer({"nll": nll, "n": ids.shape[1] - 1})
            else:
                answer({"error": f"unknown op {req['op']!r}"})
        except Exception as e:
            answer({"error": f"{type(e).__name__}: {e}"})
    runner.close()


if __name__ == "__main__":
    main()
