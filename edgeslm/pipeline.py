"""The main job behind `edgeslm deploy`: model -> (fine-tune) -> quantize once -> export every target
-> verify -> latency checks per device -> report.json + report.html.

A recipe is a small TOML file (every key optional):

    model = "smollm2-135m"            # a HF folder, a .gguf, or the embedded default
    scheme = "q4g32-gptq"             # see edgeslm/schemes.py
    targets = ["onnx", "executorch"]  # default: onnx, executorch, gguf where this machine can build them
    devices = ["host", "pixel-8", "iphone-15-pro"]
    budget = "budgets.toml"           # overrides the device profiles' default budgets
    context = 512                     # static KV-cache length of the artifacts
    [finetune]                        # optional; keys of edgeslm.finetune.FinetuneConfig plus `data`
    data = "train.jsonl"
    steps = 100

Steps are cached: the quantized reference lives in the edgeslm cache, and a target folder whose
manifest names the same reference, scheme and context is reused with its recorded parity.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckFailed, EdgeSLMError

DEFAULT_DEVICES = ("host", "pixel-8", "iphone-15-pro")


@dataclass
class Recipe:
    model: str | None = None
    scheme: str = "q4g32-gptq"
    targets: list[str] | None = None
    devices: list[str] = field(default_factory=lambda: list(DEFAULT_DEVICES))
    budget: str | None = None
    context: int = 512
    finetune: dict | None = None


def read_recipe(path) -> Recipe:
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeSLMError(f"no such recipe: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeSLMError(f"{path} is not valid TOML ({e})") from None
    known = set(Recipe.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EdgeSLMError(f"{path}: unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    recipe = Recipe(**raw)
    if recipe.budget and not Path(recipe.budget).is_absolute():
        recipe.budget = str(path.parent / recipe.budget)
    if recipe.finetune is not None and "data" not in recipe.finetune:
        raise EdgeSLMError(f"{path}: [finetune] needs a `data` file")
    return recipe


# Built and verified by default. The other two are opt-in (`--target coreml`, `--target webgpu`, or a
# recipe): their Linux verification of a 135M model is too slow for a default run here (Core ML: a
# numpy MIL executor at ~2 s per token; WebGPU: SwiftShader, a CPU rasteriser, in headless Chromium).
DEFAULT_ON = ("onnx", "executorch", "gguf")
OPT_IN_REASON = "opt-in: its verification on Linux takes tens of minutes for this model; name it with --target"


def default_targets() -> tuple[list[str], dict[str, str]]:
    """The default targets this machine can build, and why each other registered target is left out."""
    from .targets.registry import TARGETS, get_target

    usable, missing = [], {}
    for name in TARGETS:
        target = get_target(name)
        # GGUF exports anywhere but needs llama.cpp to verify: without it, not a default
        reason = target.unavailable_reason() or getattr(target, "runtime_reason", lambda: None)()
        if reason:
            missing[name] = reason
        elif name not in DEFAULT_ON:
            missing[name] = OPT_IN_REASON
        else:
            usable.append(name)
    return usable, missing


def _cached_manifest(folder: Path, reference: str, scheme: str, context: int) -> dict | None:
    from .artifact import check_hashes, read_manifest

    if not (folder / "manifest.json").is_file():
        return None
    try:
        m = read_manifest(folder)
    except EdgeSLMError:
        return None
    same = (m.get("reference") == reference and m.get("scheme") == scheme and m.get("context_length") == context
            and m.get("parity") is not None)
    return m if same and not check_hashes(folder, m) else None


def run_deploy(recipe: Recipe, out: Path, progress: bool = True, log=print) -> dict:
    """Runs every step; returns the report dict (also written as report.json / report.html)."""
    from .artifact import tool_versions
    from .artifact import read_manifest
    from .devices import budgets_for, get_profile, load_budget_file
    from .export import export_artifact
    from .latency import figures_for, judge
    from .quantize import reference_folder
    from .report import render_html
    from .schemes import get_scheme

    started = time.perf_counter()
    out = Path(out)
    scheme = get_scheme(recipe.scheme)
    usable, missing = default_targets()
    targets = recipe.targets if recipe.targets is not None else usable
    from .targets.registry import get_target

    for name in targets:
        get_target(name)  # unknown names fail here, before any work
    profiles = [get_profile(d) for d in recipe.devices]
    overrides = load_budget_file(recipe.budget) if recipe.budget else None
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    model_name = recipe.model or "smollm2-135m"
    if recipe.finetune:
        from .finetune import FinetuneConfig, finetune

        t0 = time.perf_counter()
        opts = dict(recipe.finetune)
        data = opts.pop("data")
        tuned = out / "finetuned"
        if not (tuned / "config.json").is_file():
            log(f"[deploy] fine-tuning on {data}")
            finetune(model_name, data, tuned, FinetuneConfig(**opts), merge=True)
        model_name = str(tuned)
        timings["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[deploy] quantizing once: {scheme.name} ({scheme.describe()})")
    reference = str(reference_folder(model_name, scheme, progress=progress).resolve())
    timings["quantize_s"] = time.perf_counter() - t0

    target_rows = []
    for name in targets:
        folder = out / name
        t0 = time.perf_counter()
        row = {"target": name, "dir": str(folder)}
        manifest = _cached_manifest(folder, reference, scheme.name, recipe.context)
        try:
            if manifest is not None:
                log(f"[deploy] {name}: cached artifact, verified {manifest['created']}")
                row["cached"] = True
            else:
                log(f"[deploy] {name}: export + verify")
                manifest = export_artifact(model_name, name, scheme.name, folder, force=True,
                                           context=recipe.context, progress=progress)
        except CheckFailed as e:  # written, but a parity bound failed: keep going, report it
            manifest = read_manifest(folder)
            row["reason"] = str(e)
        except EdgeSLMError as e:
            row.update(ok=None, reason=str(e))
            target_rows.append(row)
            continue
        parity = manifest.get("parity") or {}
        size = sum(f["bytes"] for p, f in manifest["files"].items() if not p.startswith("tokenizer"))
        params = manifest.get("parameters")
        row.update(ok=bool(parity.get("passed")), bytes=size, bytes_per_param=size / params if params else None,
                   parity=parity, seconds=time.perf_counter() - t0)
        target_rows.append(row)

    checks = []
    timing = {"decode_tokens": 32, "runs": 3, "warmup": 1}
    for row in target_rows:
        if row.get("ok") is None:
            continue
        folder = Path(row["dir"])
        manifest = read_manifest(folder)
        for profile in profiles:
            budgets = budgets_for(profile, overrides)
            log(f"[deploy] check {row['target']} on {profile.name}")
            for result in figures_for(folder, manifest, profile, int(budgets["prompt_tokens"]), **timing):
                for c in judge(result, budgets):
                    checks.append({"target": row["target"], "device": profile.name, "metric": c["figure"],
                                   "value": c["value"], "spread": c.get("p90"), "budget": c["budget"],
                                   "ok": c["pass"], "runner": result.get("runner"),
                                   "source": "measured" if result.get("measured") else "estimated"})

    log("[deploy] perplexity of the float model and of the quantized reference")
    schemes = [{"scheme": "f32", **_reference_quality(model_name)},
               {"scheme": scheme.name, "chosen": True, **_reference_quality(reference)}]
    schemes += [{"scheme": f"{r['target']} artifact", "bytes": r.get("bytes"),
                 "perplexity": (r.get("parity") or {}).get("ppl_artifact")} for r in target_rows if r.get("bytes")]

    timings["total_s"] = time.perf_counter() - started
    ok = all(r.get("ok") for r in target_rows if r.get("ok") is not None) and all(c["ok"] for c in checks)
    ok = ok and any(r.get("ok") for r in target_rows)
    from .loading import load_model

    params = sum(p.numel() for p in load_model(model_name, with_tokenizer=False)[0].parameters())
    report = {
        "model_name": recipe.model or "smollm2-135m (embedded)",
        "scheme": scheme.name,
        "reference": reference,
        "parameters": params,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ok": ok,
        "targets": target_rows,
        "checks": checks,
        "schemes": schemes,
        "not_available": {k: v for k, v in missing.items() if k not in targets},
        "timings": timings,
        "tools": tool_versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.html").write_text(render_html(report))
    return report


def _reference_quality(model_name) -> dict:
    """Weight bytes and Brown-test perplexity of a (float or quantized) reference folder."""
    from .data import load_eval_text
    from .evaluate import decoder_logits_fn, eval_tokens, perplexity
    from .loading import load_model

    model, tok, folder = load_model(model_name)
    tokens = eval_tokens(tok, load_eval_text("brown:test"))
    return {"bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "perplexity": perplexity(decoder_logits_fn(model), tokens, progress=False)["perplexity"]}
