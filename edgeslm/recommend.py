"""Which model, scheme and target for a task on a device: memory arithmetic plus the roofline.

For every candidate of the data file (candidates.toml: each model's published config.json fields,
with its source and licence) this builds the decoder edgeslm would run, on the meta device (no
weights), and takes from it the exact parameter count and KV-cache shape. For every scheme and every
target the device runs it computes, with the calculator `edgeslm info` uses (memory.py):

  weight bytes   parameters x the scheme's bytes per weight
  KV bytes       the cache at the budget's context, in the dtype the target's artifacts hold it
  TTFT, decode   devices.estimate, the roofline of `edgeslm check` (peak bandwidth and compute, so a
                 ceiling on speed), always labelled ESTIMATED

and judges them against the device's budgets (its profile's, overridden by a budget file). A
combination fits when the target can express the model and scheme (Target.unsupported_reason),
the context is within the model's, the model suits the task, and every budgeted figure holds.
Fits are ranked by the task's order of preference for the model, then by the scheme's precision,
then by estimated decode speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeSLMError

CANDIDATES = Path(__file__).parent / "candidates.toml"
DEFAULT_CONTEXT = 2048
DECODE_TOKENS = 32  # as `edgeslm check` times decode by default

# scheme -> the memory calculator's precision; listed from the most to the least precise
SCHEMES = {"f16": "fp16", "f32": "fp32", "q8c": "int8", "q4g32-gptq": "int4-g32"}
SCHEME_ORDER = {"f16": 0, "f32": 0, "q8c": 1, "q4g32-gptq": 2}
# bytes per KV-cache value in each target's artifacts: fp32 caches in the ONNX, ExecuTorch and
# WebGPU graphs, fp16 in Core ML's fp16 compute, and in llama.cpp (GGUF) its default fp16 except
# under f32 weights (the gguf target then asks for an f32 cache)
KV_BYTES = {"onnx": 4, "executorch": 4, "webgpu": 4, "gguf": 2, "coreml": 2}


def kv_bytes_per_value(target: str, scheme: str) -> int:
    if target == "gguf" and scheme == "f32":
        return 4
    return KV_BYTES.get(target, 4)


@dataclass(frozen=True)
class Candidate:
    name: str
    display: str
    source: str
    licence: str
    parameters: int
    config: dict


def load_candidates(path=None) -> tuple[dict[str, Candidate], dict[str, dict]]:
    """-> ({name: Candidate}, {task: its table}) from candidates.toml or a user's file of that form."""
    path = Path(path) if path else CANDIDATES
    from .devices import read_toml

    data = read_toml(path, "candidates file")
    models = {}
    for i, m in enumerate(data.get("model", [])):
        missing = [k for k in ("name", "source", "licence", "parameters", "config") if k not in m]
        if missing or "model_type" not in m.get("config", {}):
            raise EdgeSLMError(f"{path}: model #{i + 1} lacks {', '.join(missing or ['config.model_type'])}")
        models[m["name"]] = Candidate(m["name"], m.get("display", m["name"]), m["source"], m["licence"],
                                      int(m["parameters"]), dict(m["config"]))
    if not models:
        raise EdgeSLMError(f"{path} lists no [[model]]")
    tasks = data.get("task", {})
    for name, t in tasks.items():
        unknown = [m for m in t.get("models", []) + [t.get(k) for k in ("best", "budget", "mobile") if t.get(k)]
                   if m not in models]
        if unknown:
            raise EdgeSLMError(f"{path}: task {name} names unknown models: {', '.join(sorted(set(unknown)))}")
    return models, tasks


def hf_config(candidate: Candidate):
    from transformers import CONFIG_MAPPING

    from .config import SUPPORTED_MODEL_TYPES

    fields = dict(candidate.config)
    model_type = fields.pop("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or model_type not in CONFIG_MAPPING:
        raise EdgeSLMError(f"candidate {candidate.name}: unsupported architecture {model_type!r}")
    try:
        return CONFIG_MAPPING[model_type](**fields)
    except Exception as e:  # transformers raises many types for values it rejects
        raise EdgeSLMError(f"candidate {candidate.name}: transformers rejects its config ({e})") from None


def meta_decoder(candidate: Candidate):
    """The decoder edgeslm builds for this config, on the meta device: shapes without memory."""
    import torch

    from .loading import build_decoder

    with torch.device("meta"):
        return build_decoder(hf_config(candidate))


def _figures(profile, spec, parameters: int, scheme: str, target: str, context: int, prompt_tokens: int) -> dict:
    from .devices import ArtifactFacts, estimate
    from .memory import kv_cache_bytes, weight_bytes

    weights = weight_bytes(parameters, SCHEMES[scheme])
    kv_bytes = kv_bytes_per_value(target, scheme)
    kv = kv_cache_bytes(spec, context, kv_bytes)
    per_layer = 2 * spec.num_kv_heads * spec.head_dim * kv_bytes
    n_local = sum(spec.layer_is_local) if spec.sliding_window else 0
    facts = ArtifactFacts(target=target, size_bytes=weights, params=parameters,
                          embedding_params=spec.vocab_size * spec.hidden_size, tied=spec.tie_embeddings,
                          layers=spec.num_layers, heads=spec.num_heads, head_dim=spec.head_dim,
                          kv_bytes_per_position=per_layer * (spec.num_layers - n_local),
                          local_kv_bytes=per_layer * n_local, window=spec.sliding_window if n_local else None,
                          context_length=context)
    est = estimate(profile, facts, prompt_tokens, DECODE_TOKENS)
    return {"weight_bytes": weights, "kv_cache_bytes": kv, "kv_dtype": {2: "fp16", 4: "fp32"}[kv_bytes],
            "memory_bytes": weights + kv,
            "estimated": {"label": "ESTIMATED (roofline)", "ttft_ms": est["ttft_ms"],
                          "decode_tok_s": est["decode_tok_s"], "peak_memory_mb": est["peak_memory_mb"],
                          "bound": est["bound"]}}


def _judge(row: dict, budgets: dict, profile) -> tuple[list[str], dict]:
    """-> (why the row misses its budgets, {budget key: the value it would need})."""
    est = row["estimated"]
    values = {"artifact_mb": row["weight_bytes"] / 1e6, "peak_memory_mb": row["memory_bytes"] / 1e6,
              "ttft_ms": est["ttft_ms"], "decode_tok_s": est["decode_tok_s"]}
    reasons, needs = [], {}
    for key, value in values.items():
        if key not in budgets:
            continue
        limit = budgets[key]
        if key == "decode_tok_s":
            if value < limit:
                reasons.append(f"decode {value:.1f} tok/s (ESTIMATED) < budget {limit:g}")
                needs[key] = value
        elif value > limit:
            unit = "ms" if key == "ttft_ms" else "MB"
            what = {"artifact_mb": "weights", "peak_memory_mb": "weights + KV cache", "ttft_ms": "TTFT (ESTIMATED)"}[key]
            reasons.append(f"{what} {value:,.0f} {unit} > budget {limit:,.0f} {unit}")
            needs[key] = value
    usable = profile.usable_app_memory_gb * 1e9
    if row["memory_bytes"] > usable:
        reasons.append(f"weights + KV cache {row['memory_bytes'] / 1e9:.2f} GB > the {profile.usable_app_memory_gb:g} GB "
                       f"an app may use on {profile.name}")
        needs["usable_app_memory_gb"] = row["memory_bytes"] / 1e9
    return reasons, needs


def _shortfall(row: dict, budgets: dict) -> float:
    """How far a row misses its budgets: the worst ratio of need to budget (1 = just fits)."""
    worst = 1.0
    for key, need in row["needs"].items():
        if key == "decode_tok_s":
            worst = max(worst, budgets[key] / max(need, 1e-9))
        elif key in budgets:
            worst = max(worst, need / budgets[key])
    return worst


def recommend(task: str, device: str, budget_file=None, context: int | None = None, candidates_file=None,
              profile_dirs=()) -> dict:
    from .devices import get_profile, read_toml, validate_budgets
    from .schemes import get_scheme
    from .targets.registry import TARGETS, get_target

    models, tasks = load_candidates(candidates_file)
    if task not in tasks:
        raise EdgeSLMError(f"unknown task {task!r}; known: {', '.join(sorted(tasks))}")
    profile = get_profile(device, profile_dirs)
    budgets = dict(profile.budgets)
    if budget_file:
        data = read_toml(Path(budget_file), "budget file")
        per_device = data.pop("device", {})
        if not isinstance(per_device, dict):
            raise EdgeSLMError(f"budget file {budget_file}: [device] must hold one table per device name")
        mine = dict(per_device.get(profile.name, {}))
        for where, table in ((f"budget file {budget_file}", data), (f"budget file {budget_file} [device.{profile.name}]", mine)):
            if "context" in table:
                context = context or _context(table.pop("context"), where)
            budgets.update(validate_budgets(table, where))
    context = context or DEFAULT_CONTEXT
    if context < 1:
        raise EdgeSLMError(f"--context must be positive, not {context}")
    prompt_tokens = int(budgets["prompt_tokens"])
    if prompt_tokens >= context:
        raise EdgeSLMError(f"the budget's prompt_tokens ({prompt_tokens}) must be below the context ({context})")
    table = tasks[task]
    order = {m: i for i, m in enumerate(table.get("models", []))}
    picks = {k: table[k] for k in ("best", "budget", "mobile") if table.get(k)}
    targets = [t for t in profile.targets if t in TARGETS]
    rows = []
    for name, cand in models.items():
        decoder = meta_decoder(cand)
        spec = decoder.spec
        max_context = int(getattr(decoder.hf_config, "max_position_embeddings", 0) or 0)
        for scheme_name in SCHEMES:
            scheme = get_scheme(scheme_name)
            for target_name in targets:
                row = {"model": name, "display": cand.display, "scheme": scheme_name, "target": target_name,
                       "parameters": cand.parameters, "layers": spec.num_layers, "heads": spec.num_heads,
                       "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
                       "model_context": max_context, "context": context, "licence": cand.licence,
                       "source": cand.source, "task_rank": order.get(name),
                       "pick": next((k for k, v in picks.items() if v == name), None),
                       **_figures(profile, spec, cand.parameters, scheme_name, target_name, context, prompt_tokens)}
                blocking = []
                if name not in order:
                    blocking.append(f"not suited to {task} (the task table: {table.get('basis', 'editorial')})")
                if max_context and context > max_context:
                    blocking.append(f"context {context} > the model's {max_context}")
                why = get_target(target_name).unsupported_reason(decoder, scheme)
                if why:
                    blocking.append(f"{target_name}: {why}")
                reasons, needs = _judge(row, budgets, profile)
                row.update(blocking=blocking, reasons=blocking + reasons, needs=needs,
                           fits=not blocking and not reasons)
                rows.append(row)
    fits = sorted((r for r in rows if r["fits"]),
                  key=lambda r: (r["task_rank"], SCHEME_ORDER[r["scheme"]], -r["estimated"]["decode_tok_s"]))
    for i, r in enumerate(fits, 1):
        r["rank"] = i
    misfits = [r for r in rows if not r["fits"]]
    nearest = sorted((r for r in misfits if not r["blocking"]),
                     key=lambda r: (_shortfall(r, budgets), r["task_rank"], SCHEME_ORDER[r["scheme"]]))[:5]
    return {"task": task, "task_description": table.get("description", task), "task_basis": table.get("basis"),
            "picks": picks, "device": profile.name, "device_display": profile.display, "budgets": budgets,
            "context": context, "prompt_tokens": prompt_tokens, "decode_tokens": DECODE_TOKENS,
            "figures": "ESTIMATED",
            "basis": f"roofline on {profile.bandwidth_gbs:g} GB/s, {profile.compute_gflops:g} GFLOP/s (the device "
                     "profile's peak figures, so a ceiling on speed, as in `edgeslm check`); memory = weights + KV "
                     "cache, runtime overhead not included",
            "candidates_file": str(Path(candidates_file) if candidates_file else CANDIDATES),
            "ranked": fits, "misfits": misfits,
            "nearest": [{k: r[k] for k in ("model", "scheme", "target", "weight_bytes", "kv_cache_bytes",
                                           "estimated", "needs", "reasons")} for r in nearest]}


def _context(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EdgeSLMError(f"{where}: context must be a positive whole number of tokens, got {value!r}")
    return value


def nothing_fits_message(result: dict) -> str:
    parts = []
    for r in result["nearest"][:3]:
        needs = ", ".join(_need_text(k, v) for k, v in r["needs"].items())
        parts.append(f"{r['model']} {r['scheme']}/{r['target']} needs {needs}")
    head = (f"no candidate fits {result['device']} for {result['task']} within its budgets at context "
            f"{result['context']}")
    return head + ("; nearest: " + "; ".join(parts) if parts else "; no candidate suits the task on this device's targets")


def _need_text(key: str, value: float) -> str:
    if key == "decode_tok_s":
        return f"decode_tok_s <= {math.floor(value * 10) / 10:g}"
    if key == "usable_app_memory_gb":
        return f"{value:.2f} GB of app memory"
    return f"{key} >= {math.ceil(value):,}"
