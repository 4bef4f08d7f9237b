"""An edgeslm WebGPU artifact in @mlc-ai/web-llm's own engine, against the PyTorch reference.

    python benchmarks/webgpu_webllm.py ARTIFACT_DIR [--steps 32] [--prompt TEXT] [--json OUT]

ARTIFACT_DIR comes from `edgeslm export MODEL --target webgpu ...`. The script loads it with
CreateMLCEngine (WebLLM 0.2.85) in headless Chromium, as browser.WebLLMRunner does, and:
  1. greedy tokens: the prompt's ids through the engine's forwardTokensAndSample at temperature 0
     (prefill, then one decode per token), compared with the reference's greedy tokens;
  2. the engine's completions.create on the prompt text (its own tokenizer), compared with the
     reference continuation decoded by the model's tokenizer.
Timings are the page's (performance.now around each engine call).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from edgeslm.loading import load_model, load_tokenizer
    from edgeslm.model import generate_greedy
    from edgeslm.ops import reference_only
    from edgeslm.targets.webgpu.browser import WebLLMRunner

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    reference, _, _ = load_model(manifest["reference"], with_tokenizer=False)
    tok = load_tokenizer(manifest["reference"])
    ids = torch.tensor([tok(args.prompt)["input_ids"]])
    with reference_only():
        ref_tokens, ref_logits = generate_greedy(reference.float().eval(), ids, args.steps)
    ref = ref_tokens[0].tolist()
    top2 = ref_logits[0].topk(2, dim=-1).values
    t0 = time.time()
    runner = WebLLMRunner(args.artifact, timeout_s=1800)
    load_s = time.time() - t0
    try:
        tokens = runner.generate_greedy(ids, args.steps).tolist()
        timings = runner.last_timings
        completion = runner.complete(args.prompt, args.steps)
        runtime = runner.runtime
    finally:
        runner.close()
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {
        "artifact": str(args.artifact),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "runtime": runtime,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "prompt": args.prompt,
        "prompt_tokens": int(ids.shape[1]),
        "steps": args.steps,
        "webllm_tokens": tokens,
        "reference_tokens": ref,
        "tokens_equal": tokens == ref,
        "identical_prefix": same,
        "reference_min_top2_gap": float((top2[:, 0] - top2[:, 1]).min()),
        "completion_text": completion.get("text"),
        "reference_text": tok.decode(ref),
        "completion_equal_text": completion.get("text") == tok.decode(ref),
        "load_s": round(load_s, 1),
        "prefill_ms": timings["prefill_ms"],
        "decode_ms_median": timings["decode_ms_median"],
        "webgpu": manifest.get("webgpu"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if result["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
