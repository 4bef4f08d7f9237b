"""Peak memory of loading a model: a synthetic 1B-parameter bf16 Llama folder, made on the fly.

    python benchmarks/loading.py [--json] [--keep DIR] [--gptq-tokens N]

Each measurement runs in a fresh child process and reads its peak RSS from os.wait4 (the kernel's
ru_maxrss). `baseline` is the same child importing torch and edgeslm without loading; `load` is
edgeslm.load_model(folder, dtype=bf16): the decoder is built on the meta device and takes the
safetensors tensors as its own (load_state_dict(assign=True)); those are backed by the memory-mapped
files, so right after loading little is resident. `touch` then reads every weight once, which makes
all of it resident: the goal is that peak <= 1.3x the weight bytes. The random weights are irrelevant to memory; the shapes are Llama-3.2-1B-like.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
          "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True, "torch_dtype": "bfloat16", "rope_theta": 500000.0}


def make_folder(folder: Path) -> int:
    """Writes config.json and one safetensors shard per layer; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    c = CONFIG
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    total = 0
    shard = {"model.embed_tokens.weight": rand(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shard.update({p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                      p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                      p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                      p + "mlp.down_proj.weight": rand(h, i),
                      p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        total += sum(t.numel() * 2 for t in shard.values())
        save_file(shard, folder / f"model-{layer:05d}.safetensors", metadata={"format": "pt"})
        shard = {}
    return total


CHILD = """
import sys, torch
from edgeslm.loading import load_model
if sys.argv[1] in ("load", "touch"):
    model, _, _ = load_model(sys.argv[2], dtype=torch.bfloat16, with_tokenizer=False)
    if sys.argv[1] == "touch":  # read every weight once, so every page of it is resident
        sum(float(p.sum()) for p in model.parameters())
    print(sum(p.numel() for p in model.parameters()))
elif sys.argv[1] == "gptq":
    from edgeslm.quantizer import quantize_model
    from edgeslm.schemes import get_scheme
    model, _, _ = load_model(sys.argv[2], with_tokenizer=False)  # fp32: what GPTQ computes in
    calibration = torch.randint(0, model.spec.vocab_size, (1, int(sys.argv[3])), generator=torch.Generator().manual_seed(0))
    quantize_model(model, get_scheme("q4g32-gptq"), calibration, progress=False)
    print(sum(p.numel() for p in model.parameters()))
"""


def peak_rss(args: list[str]) -> tuple[float, str, float]:
    """-> (peak RSS in bytes, stdout, seconds) of a child python process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed")
    return usage.ru_maxrss * 1024, out.strip(), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="make (or reuse) the folder here instead of a temporary one")
    ap.add_argument("--gptq-tokens", type=int, default=0, metavar="N",
                    help="also quantize it with q4g32-gptq on N random calibration tokens (fp32; minutes per layer "
                         "on 2 cores) and report that peak against the fp32 model's bytes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "synthetic-1b-bf16"
        weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0
        if not weight_bytes:
            print(f"writing {folder} ...", file=sys.stderr)
            make_folder(folder)
            weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        base, _, _ = peak_rss(["baseline"])
        loaded, params, seconds = peak_rss(["load", str(folder)])
        peak, _, _ = peak_rss(["touch", str(folder)])
        result = {"parameters": int(params), "weight_bytes": weight_bytes, "baseline_rss_bytes": base,
                  "load_peak_rss_bytes": loaded, "load_seconds": round(seconds, 1),
                  "touched_peak_rss_bytes": peak,
                  "peak_over_weights": peak / weight_bytes, "peak_minus_baseline_over_weights": (peak - base) / weight_bytes,
                  "goal": "peak RSS <= 1.3 x weight bytes (measured with every weight read once)"}
        if args.gptq_tokens:
            gptq_peak, _, gptq_seconds = peak_rss(["gptq", str(folder), str(args.gptq_tokens)])
            fp32 = 2 * weight_bytes
            result.update(gptq_calibration_tokens=args.gptq_tokens, gptq_peak_rss_bytes=gptq_peak,
                          gptq_seconds=round(gptq_seconds, 1), fp32_model_bytes=fp32,
                          gptq_peak_minus_baseline_over_fp32_model=(gptq_peak - base) / fp32)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{int(params) / 1e9:.2f}B parameters, {weight_bytes / 2**30:.2f} GiB bf16: loaded in "
              f"{loaded / 2**30:.2f} GiB RSS; with every weight read, peak RSS "
              f"{peak / 2**30:.2f} GiB = {result['peak_over_weights']:.2f}x the weights "
              f"({(peak - base) / 2**30:.2f} GiB above the {base / 2**30:.2f} GiB of importing torch + edgeslm), "
              f"loaded in {seconds:.0f} s")
        if args.gptq_tokens:
            print(f"q4g32-gptq on {args.gptq_tokens} tokens: peak RSS {result['gptq_peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{result['gptq_peak_minus_baseline_over_fp32_model']:.2f}x the fp32 model above the baseline, "
                  f"{result['gptq_seconds']:.0f} s")


if __name__ == "__main__":
    main()
