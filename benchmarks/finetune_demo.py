"""The fine-tuning demonstration of the quantization issue, on SmolLM2-135M (not a CI test: ~15 CPU minutes).

    python benchmarks/finetune_demo.py [--lines 300] [--steps 8] [--seq-len 128] [--out /tmp/edgeslm-ft-demo]

1. writes the first --lines paragraphs of the Brown train split to a text file;
2. `edgeslm eval` on Brown valid before; `edgeslm finetune --merge` (LoRA r=8 on q/k/v/o + MLP);
   `edgeslm eval` on the merged folder after;
3. checks that the merged model equals base + adapters to 1e-4 (max |logit difference|);
4. QLoRA: a few steps of `edgeslm finetune --qlora q4g32-rtn` over the frozen int4 base; the loss must fall.
Prints one JSON object with every figure (benchmarks/RESULTS.md records a run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]


def cli(*args) -> dict:
    done = subprocess.run(EDGESLM + [str(a) for a in args] + ["--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"edgeslm {args[0]} failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--qlora-steps", type=int, default=6)
    ap.add_argument("--out", default="/tmp/edgeslm-ft-demo")
    args = ap.parse_args(argv)
    from edgeslm.data import brown_documents

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for doc in brown_documents("train") for p in doc.splitlines() if len(p.split()) >= 8]
    data = out / "brown-train-lines.txt"
    data.write_text("\n".join(paragraphs[: args.lines]) + "\n")
    result = {"lines": args.lines, "data": str(data)}

    before = cli("eval", "--data", "brown:valid")
    tuned = cli("finetune", "--data", data, "--out", out / "lora", "--merge", "--force", "--steps", args.steps,
                "--seq-len", args.seq_len, "--lr", "1e-3", "--no-progress")
    after = cli("eval", out / "lora", "--data", "brown:valid")
    result.update(valid_ppl_before=before["perplexity"], valid_ppl_after=after["perplexity"],
                  lora_steps=tuned["steps"], lora_examples=tuned["examples"], lora_first_loss=tuned["first_loss"],
                  lora_last_loss=tuned["last_loss"], lora_seconds=tuned["seconds"])

    from edgeslm.finetune import FinetuneConfig, add_lora, load_adapters
    from edgeslm.loading import load_model

    base, tok, _ = load_model(None)
    adapted = load_adapters(add_lora(base, FinetuneConfig()), out / "lora" / "adapter.safetensors").eval()
    merged, _, _ = load_model(out / "lora")
    ids = tok(paragraphs[args.lines], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        a, m = adapted(ids)[0], merged(ids)[0]
    result["merged_vs_adapter_max_abs"] = (a - m).abs().max().item()
    result["logits_max_abs"] = a.abs().max().item()

    q = cli("finetune", "--data", data, "--out", out / "qlora", "--qlora", "q4g32-rtn", "--force", "--steps",
            args.qlora_steps, "--batch-size", "2", "--seq-len", "128", "--lr", "1e-3", "--no-progress")
    result.update(qlora_losses=q["losses"], qlora_seconds=q["seconds"])
    print(json.dumps(result, indent=2))
    ok = (result["valid_ppl_after"] < result["valid_ppl_before"] and result["merged_vs_adapter_max_abs"] <= 1e-4
          and q["losses"][-1] < q["losses"][0])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
