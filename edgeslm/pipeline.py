"""The main job behind `edgeslm deploy`: model -> (fine-tune) -> quantize once -> export every target
-> verify -> latency checks per device -> report.json + report.html.

A recipe is a small TOML file (every key optional):

    model = "smollm2-135m"            # a HF folder, a .gguf, or the embedded default
    scheme = "q4g32-gptq"             # see edgeslm/schemes/__init__.py
    targets = ["onnx", "executorch"]  # default: onnx, executorch, gguf where this machine can build them
    devices = ["host", "pixel-8"]     # default: host; a device no runner reaches is only estimated
    allow_estimates = false           # true: an estimate within budget (UNVERIFIED) does not fail deploy
    budget = "budgets.toml"           # overrides the device profiles' default budgets
    context = 512                     # static KV-cache length of the artifacts
    [finetune]                        # optional; keys of edgeslm.finetune_config.FinetuneConfig plus `data`
    data = "train.jsonl"
    steps = 100

Steps are cached by content: the quantized reference lives in the edgeslm cache under a key of the
model's files, the calibration text and the tool versions; the fine-tuned model under a key of the
model, the data file's bytes and the settings; and a target folder is reused with its recorded
parity only when its manifest names the same reference, scheme, context and tool versions.

deploy exits 0 only when every requested target was built and verified, and every (artifact,
device) figure was measured and passed or has no budget (estimates need allow_estimates).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckFailed, EdgeSLMError

DEFAULT_DEVICES = ("host",)


@dataclass
class Recipe:
    model: str | None = None
    scheme: str = "q4g32-gptq"
    targets: list[str] | None = None
    devices: list[str] = field(default_factory=lambda: list(DEFAULT_DEVICES))
    budget: str | None = None
    context: int | None = None
    finetune: dict | None = None
    allow_estimates: bool = False


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
    check_recipe(recipe, str(path))
    if recipe.budget and not Path(recipe.budget).is_absolute():
        recipe.budget = str(path.parent / recipe.budget)
    if recipe.finetune is not None and not Path(recipe.finetune["data"]).is_absolute():
        recipe.finetune["data"] = str(path.parent / recipe.finetune["data"])
    return recipe


def check_recipe(recipe: Recipe, where: str = "recipe"):
    """Types and values of every key, so a bad recipe is one clear line before any work."""
    def want(ok, key, what):
        if not ok:
            raise EdgeSLMError(f"{where}: `{key}` must be {what} (got {getattr(recipe, key)!r})")

    def str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    want(recipe.model is None or isinstance(recipe.model, str), "model", "a string")
    want(isinstance(recipe.scheme, str), "scheme", "a string")
    want(recipe.targets is None or str_list(recipe.targets), "targets", "a list of target names")
    want(str_list(recipe.devices) and recipe.devices, "devices", "a non-empty list of device names")
    want(recipe.budget is None or isinstance(recipe.budget, str), "budget", "a file path")
    want(recipe.context is None or (type(recipe.context) is int and recipe.context >= 16), "context",
         "an integer >= 16")
    want(isinstance(recipe.allow_estimates, bool), "allow_estimates", "true or false")
    if recipe.finetune is not None:
        from .finetune_config import FinetuneConfig

        want(isinstance(recipe.finetune, dict), "finetune", "a table")
        if not isinstance(recipe.finetune.get("data"), str):
            raise EdgeSLMError(f"{where}: [finetune] needs a `data` file")
        known = set(FinetuneConfig.__dataclass_fields__)
        unknown = sorted(set(recipe.finetune) - known - {"data"})
        if unknown:
            raise EdgeSLMError(f"{where}: unknown [finetune] key(s) {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(known | {'data'}))}")
        defaults = FinetuneConfig()
        optional_ints, optional_strs = {"steps"}, {"qlora", "teacher"}
        for key, value in recipe.finetune.items():
            if key in ("data", "extra"):
                continue
            default = getattr(defaults, key)
            if key in optional_ints or type(default) is int:
                ok = type(value) is int and value >= (0 if key == "seed" else 1)
                what = "a positive integer"
            elif key in optional_strs:
                ok, what = isinstance(value, str), "a string"
            elif type(default) is bool:
                ok, what = isinstance(value, bool), "true or false"
            elif type(default) is float:
                ok = type(value) in (int, float) and math.isfinite(value) and value >= 0
                what = "a non-negative number"
            else:
                ok, what = isinstance(value, list) and all(isinstance(x, str) for x in value), "a list of strings"
            if not ok:
                raise EdgeSLMError(f"{where}: [finetune] `{key}` must be {what} (got {value!r})")


# Built and verified by default. The others are opt-in (`--target NAME`, or a recipe): on this
# 2-core Linux machine each takes tens of minutes for a 135M model. Core ML verifies in a numpy MIL
# executor (~2 s per token); WebGPU in SwiftShader, a CPU rasteriser, in headless Chromium; and
# ExecuTorch's int4 program, with the LLM runner's dynamic-length forward, lowers through XNNPACK
# in tens of minutes (a 2-layer tiny model took 7 min on a loaded machine).
DEFAULT_ON = ("onnx", "gguf")
OPT_IN_REASONS = {
    "executorch": "opt-in: lowering the int4 program with a dynamic-length forward takes ~8 minutes for "
                  "SmolLM2-135M on 2 cores; name it with --target executorch",
}
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
            missing[name] = OPT_IN_REASONS.get(name, OPT_IN_REASON)
        else:
            usable.append(name)
    return usable, missing


def _cached_manifest(folder: Path, reference: str, scheme: str, context: int | None) -> dict | None:
    """The manifest of a finished target folder made from the same inputs by the same tools, else None."""
    from .artifact import check_hashes, read_manifest, tool_versions

    if not (folder / "manifest.json").is_file():
        return None
    try:
        m = read_manifest(folder)
    except EdgeSLMError:
        return None
    same = (m.get("reference") == reference and m.get("scheme") == scheme and m.get("parity") is not None
            and (context is None or m.get("context_length") == context) and m.get("tools") == tool_versions())
    return m if same and not check_hashes(folder, m) else None


def log_to_stderr(message: str):
    """deploy's progress: always stderr, so that stdout stays the report (JSON under --json)."""
    print(message, file=sys.stderr, flush=True)


def _finetuned(recipe: Recipe, model_name: str, out: Path, log) -> str:
    """The merged fine-tune, reused only when the model, the data's bytes and every setting match."""
    from .artifact import content_key
    from .finetune import finetune
    from .finetune_config import FinetuneConfig
    from .loading import resolve_model_path

    opts = dict(recipe.finetune)
    data = opts.pop("data")
    if not Path(data).is_file():
        raise EdgeSLMError(f"[finetune] data file {data} does not exist")
    key = content_key(resolve_model_path(model_name), Path(data), opts)[:16]
    tuned = out / f"finetuned-{key}"
    if not (tuned / "config.json").is_file():
        log(f"[deploy] fine-tuning on {data}")
        finetune(model_name, data, tuned, FinetuneConfig(**opts), merge=True)
    else:
        log(f"[deploy] fine-tuned model cached: {tuned}")
    return str(tuned)


def _build_target(name: str, model_name: str, reference: str, scheme, recipe: Recipe, out: Path, progress, log):
    """Exports and verifies one target (or reuses it); returns its report row. verdict: pass / fail."""
    from .artifact import read_manifest
    from .exporter import export_artifact

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
            manifest = export_artifact(model_name, name, scheme.name, folder, force=True, context=recipe.context,
                                       progress=progress)
    except CheckFailed as e:  # written, but a parity bound failed: keep going, report it
        manifest = read_manifest(folder)
        row["reason"] = str(e)
    except EdgeSLMError as e:  # requested but not buildable here: a failure of the deploy, named
        log(f"[deploy] {name}: FAILED: {e}")
        return {**row, "verdict": "fail", "built": False, "reason": str(e), "seconds": time.perf_counter() - t0}
    parity = manifest.get("parity") or {}
    size = sum(f["bytes"] for p, f in manifest["files"].items() if not p.startswith("tokenizer"))
    params = manifest.get("parameters")
    return {**row, "verdict": "pass" if parity.get("passed") else "fail", "built": True, "bytes": size,
            "bytes_per_param": size / params if params else None, "parity": parity,
            "seconds": time.perf_counter() - t0}


DECODE_TOKENS = 32  # timed per latency check


def _check_context(recipe: Recipe, profiles, overrides):
    """Every device's prompt plus the timed decode must fit the artifacts' context: refused up front."""
    from .config import spec_from_hf_config
    from .devices import budgets_for
    from .loading import read_hf_config, resolve_model_path
    from .parity import default_context

    context = default_context(spec_from_hf_config(read_hf_config(resolve_model_path(recipe.model))), recipe.context)
    for profile in profiles:
        prompt = int(budgets_for(profile, overrides)["prompt_tokens"])
        if prompt + DECODE_TOKENS > context:
            raise EdgeSLMError(f"device {profile.name}: prompt_tokens {prompt} + {DECODE_TOKENS} decode tokens exceed "
                               f"the artifacts' context of {context}; raise `context` or lower prompt_tokens in the "
                               f"budget file")


def _check_devices(target_rows, profiles, overrides, log) -> list[dict]:
    from .artifact import read_manifest
    from .devices import budgets_for
    from .latency import figures_for, judge

    checks = []
    timing = {"decode_tokens": DECODE_TOKENS, "runs": 3, "warmup": 1}
    for row in target_rows:
        if not row["built"]:
            continue
        folder = Path(row["dir"])
        manifest = read_manifest(folder)
        for profile in profiles:
            if row["target"] not in profile.targets:  # e.g. a GGUF for a phone profile: not a deployment
                log(f"[deploy] {row['target']} is not a target of {profile.name}: not checked there")
                continue
            budgets = budgets_for(profile, overrides)
            log(f"[deploy] check {row['target']} on {profile.name}")
            for result in figures_for(folder, manifest, profile, int(budgets["prompt_tokens"]), **timing):
                for c in judge(result, budgets):
                    checks.append({"target": row["target"], "device": profile.name, "metric": c["figure"],
                                   "value": c["value"], "spread": c.get("p90"), "budget": c["budget"],
                                   "verdict": c["verdict"], "why": c.get("why"), "runner": result.get("runner"),
                                   "source": "measured" if result.get("measured") else "estimated"})
    return checks


def run_deploy(recipe: Recipe, out: Path, progress: bool = True, log=log_to_stderr) -> dict:
    """Runs every step; returns the report dict (also written as report.json / report.html)."""
    from .artifact import tool_versions
    from .devices import get_profile, load_budget_file
    from .latency import verdicts_pass
    from .loading import load_model
    from .model import count_parameters
    from .quantizer import reference_folder
    from .report import render_html
    from .schemes import get_scheme
    from .targets.registry import get_target

    started = time.perf_counter()
    check_recipe(recipe)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgeSLMError(f"--out {out} is a file, not a folder")
    scheme = get_scheme(recipe.scheme)
    usable, missing = default_targets()
    targets = recipe.targets if recipe.targets is not None else usable
    for name in targets:
        get_target(name)  # unknown names fail here, before any work
    profiles = [get_profile(d) for d in recipe.devices]
    overrides = load_budget_file(recipe.budget) if recipe.budget else None
    _check_context(recipe, profiles, overrides)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeSLMError(f"cannot create {out}: {e.strerror or e}") from None
    timings = {}

    model_name = recipe.model or "smollm2-135m"
    if recipe.finetune:
        t0 = time.perf_counter()
        model_name = _finetuned(recipe, model_name, out, log)
        timings["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[deploy] quantizing once: {scheme.name} ({scheme.describe()})")
    reference = str(reference_folder(model_name, scheme, progress=progress).resolve())
    timings["quantize_s"] = time.perf_counter() - t0

    target_rows = [_build_target(name, model_name, reference, scheme, recipe, out, progress, log) for name in targets]
    checks = _check_devices(target_rows, profiles, overrides, log)

    log("[deploy] perplexity of the float model and of the quantized reference")
    schemes = [{"scheme": "f32", **_reference_quality(model_name)},
               {"scheme": scheme.name, "chosen": True, **_reference_quality(reference)}]
    schemes += [{"scheme": f"{r['target']} artifact", "bytes": r.get("bytes"),
                 "perplexity": (r.get("parity") or {}).get("ppl_artifact")} for r in target_rows if r.get("bytes")]

    timings["total_s"] = time.perf_counter() - started
    ok = bool(target_rows) and all(r["verdict"] == "pass" for r in target_rows)
    ok = ok and verdicts_pass(checks, recipe.allow_estimates)
    params = count_parameters(load_model(model_name, with_tokenizer=False)[0])
    report = {
        "model_name": recipe.model or "smollm2-135m (embedded)",
        "scheme": scheme.name,
        "reference": reference,
        "parameters": params,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ok": ok,
        "allow_estimates": recipe.allow_estimates,
        "verdicts": {v: sum(c["verdict"] == v for c in checks) for v in ("pass", "fail", "unverified", "reported")},
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
    from .evaluate import decoder_logits_fn, eval_tokens, perplexity, text_prefix
    from .loading import load_model

    model, tok, folder = load_model(model_name)
    tokens = eval_tokens(tok, load_eval_text("brown:test"))
    return {"bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "perplexity": perplexity(decoder_logits_fn(model), tokens, progress=False,
                                     prefix=text_prefix(tok))["perplexity"]}
