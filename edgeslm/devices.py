"""Device profiles, budgets, and the roofline estimator.

A profile is a TOML file: the ones shipped in edgeslm/devices/*.toml, plus any a user puts in a
folder named by --profiles DIR or $EDGESLM_DEVICES (os.pathsep-separated), or names directly as a
path. Each holds name, kind (host/android/ios/macos/browser), memory, usable app memory, memory
bandwidth, compute, the targets that run there, default budgets and the sources of its figures.

A budget file (TOML) overrides the defaults: top-level keys apply to every device, a
[device.NAME] table to one device:

    ttft_ms = 800              # time to first token for a prompt of prompt_tokens, at most
    [device.pixel-8]
    decode_tok_s = 25          # decode speed, at least

The estimator is a roofline: a decode step reads every weight once plus the KV cache written so
far, a prefill of N tokens does 2 x params x N flops; time is the larger of bytes / bandwidth and
flops / compute. It uses the profile's peak figures, so an estimate is a ceiling on speed (no
device does better) and is always labelled "estimated".
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeSLMError

SHIPPED = Path(__file__).parent / "devices"
KINDS = ("host", "android", "ios", "macos", "browser")

# budget key -> (direction, unit, what it bounds). "max": the figure must be <= the budget.
BUDGETS = {
    "ttft_ms": ("max", "ms", "time to first token (prefill of prompt_tokens + first argmax)"),
    "decode_tok_s": ("min", "tok/s", "decode tokens per second"),
    "peak_memory_mb": ("max", "MB", "peak resident memory of the process running the artifact"),
    "artifact_mb": ("max", "MB", "artifact size on disk"),
}
BUDGET_KEYS = ("prompt_tokens", *BUDGETS)
PROFILE_NUMBERS = ("memory_gb", "usable_app_memory_gb", "bandwidth_gbs", "compute_gflops")


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str
    display: str
    memory_gb: float
    usable_app_memory_gb: float
    bandwidth_gbs: float
    compute_gflops: float
    targets: tuple[str, ...]
    budgets: dict
    sources: tuple[str, ...]
    threads: int = 0
    path: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "display": self.display, "memory_gb": self.memory_gb,
                "usable_app_memory_gb": self.usable_app_memory_gb, "bandwidth_gbs": self.bandwidth_gbs,
                "compute_gflops": self.compute_gflops, "threads": self.threads, "targets": list(self.targets),
                "budgets": dict(self.budgets), "sources": list(self.sources), "path": self.path}


def read_toml(path: Path, what: str) -> dict:
    """A TOML file -> dict; an unreadable or invalid one is one line naming `what` it was."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise EdgeSLMError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeSLMError(f"{what} {path} is not valid TOML ({e})") from None


def _positive(value, where: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeSLMError(f"{where} must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise EdgeSLMError(f"{where} must be a finite number, got {value!r}")
    if value <= 0:
        raise EdgeSLMError(f"{where} must be positive, got {value!r}")
    if integer and int(value) != value:
        raise EdgeSLMError(f"{where} must be a whole number, got {value!r}")
    return int(value) if integer else float(value)


def validate_budgets(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise EdgeSLMError(f"{where} must be a table of budgets")
    out = {}
    for key, value in raw.items():
        if key not in BUDGET_KEYS:
            raise EdgeSLMError(f"{where}: unknown budget {key!r}; known: {', '.join(BUDGET_KEYS)}")
        out[key] = _positive(value, f"{where}: {key}", integer=key == "prompt_tokens")
    return out


def parse_profile(data: dict, path: Path) -> Profile:
    where = f"device profile {path}"
    for key in ("name", "kind", "targets", "budgets", "sources", *PROFILE_NUMBERS):
        if key not in data:
            raise EdgeSLMError(f"{where} has no {key!r}")
    if not isinstance(data["kind"], str) or data["kind"] not in KINDS:
        raise EdgeSLMError(f"{where}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    for key in ("targets", "sources"):
        if not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key]):
            raise EdgeSLMError(f"{where}: {key} must be a list of strings")
    if not isinstance(data["budgets"], dict):
        raise EdgeSLMError(f"{where}: [budgets] must be a table")
    if not isinstance(data.get("threads", 0), int) or isinstance(data.get("threads", 0), bool):
        raise EdgeSLMError(f"{where}: threads must be an integer")
    numbers = {k: _positive(data[k], f"{where}: {k}") for k in PROFILE_NUMBERS}
    budgets = validate_budgets(data["budgets"], f"{where} [budgets]")
    if "prompt_tokens" not in budgets:  # a figure without a budget is reported, not judged
        raise EdgeSLMError(f"{where}: budgets lack prompt_tokens")
    known = {"name", "kind", "display", "targets", "budgets", "sources", "threads", *PROFILE_NUMBERS}
    return Profile(name=str(data["name"]), kind=data["kind"], display=str(data.get("display", data["name"])),
                   targets=tuple(data["targets"]), budgets=budgets, sources=tuple(data["sources"]),
                   threads=int(data.get("threads", 0)), path=str(path),
                   extra={k: v for k, v in data.items() if k not in known}, **numbers)


def profile_dirs(extra=()) -> list[Path]:
    dirs = [SHIPPED]
    env = os.environ.get("EDGESLM_DEVICES")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    return dirs


def load_profiles(extra_dirs=()) -> dict[str, Profile]:
    """name -> Profile; a user's folder overrides a shipped profile of the same name."""
    profiles = {}
    for d in profile_dirs(extra_dirs):
        if not d.is_dir():
            raise EdgeSLMError(f"device profile folder {d} does not exist")
        for path in sorted(d.glob("*.toml")):
            p = parse_profile(read_toml(path, "device profile"), path)
            profiles[p.name] = p
    return profiles


def get_profile(name: str, extra_dirs=()) -> Profile:
    """A profile by name, or by path to a .toml file."""
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        return parse_profile(read_toml(path, "device profile"), path)
    profiles = load_profiles(extra_dirs)
    if name not in profiles:
        raise EdgeSLMError(f"unknown device {name!r}; known: {', '.join(sorted(profiles))} "
                           "(or a path to a profile .toml, or a folder via --profiles)")
    return profiles[name]


def load_budget_file(path) -> tuple[dict, dict]:
    """-> (budgets for every device, {device name: budgets}). NaN/negative/unknown keys: EdgeSLMError."""
    data = read_toml(Path(path), "budget file")
    per_device = data.pop("device", {})
    common = validate_budgets(data, f"budget file {path}")
    if not isinstance(per_device, dict):
        raise EdgeSLMError(f"budget file {path}: [device] must hold one table per device name")
    devices = {name: validate_budgets(b, f"budget file {path} [device.{name}]") for name, b in per_device.items()}
    return common, devices


def budgets_for(profile: Profile, overrides: tuple[dict, dict] | None = None) -> dict:
    budgets = dict(profile.budgets)
    if overrides:
        common, devices = overrides
        budgets.update(common)
        budgets.update(devices.get(profile.name, {}))
    return budgets


# ---- what the estimator needs to know about an artifact -------------------------------------------------

@dataclass(frozen=True)
class ArtifactFacts:
    target: str
    size_bytes: int  # all files of the artifact
    params: int  # every parameter, embedding included
    embedding_params: int
    tied: bool
    layers: int
    heads: int
    head_dim: int
    kv_bytes_per_position: int  # K and V of every global layer, for one position
    local_kv_bytes: int  # K and V of the local (sliding-window) layers, per position, capped at the window
    window: int | None
    context_length: int

    @property
    def bytes_per_param(self) -> float:
        return self.size_bytes / self.params

    @property
    def weight_bytes_per_token(self) -> float:
        """A decode step reads every weight once; an untied embedding only reads one row."""
        skip = 0 if self.tied else self.embedding_params * self.bytes_per_param
        return self.size_bytes - skip

    def kv_bytes_read(self, positions: int) -> float:
        local = self.local_kv_bytes * min(positions, self.window or positions)
        return self.kv_bytes_per_position * positions + local

    def flops_per_token(self, positions: int) -> float:
        dense = 2 * (self.params - (0 if self.tied else self.embedding_params))
        attention = 4 * self.layers * self.heads * self.head_dim * positions  # q.k and p.v
        return dense + attention


def artifact_facts(folder, manifest: dict) -> ArtifactFacts:
    from .config import spec_from_hf_config
    from .loading import read_hf_config

    # what a forward pass reads: the model files, not the tokenizer or metadata that ship beside them
    size = sum(int(f["bytes"]) for rel, f in manifest.get("files", {}).items()
               if not rel.startswith("tokenizer/") and not rel.endswith((".json", ".txt", ".md")))
    config_dir = Path(folder)  # every artifact carries its model's config.json
    if not (config_dir / "config.json").is_file():
        raise EdgeSLMError(f"{folder} has no config.json (an artifact from an older edgeslm?): re-export it")
    import torch

    from .loading import build_decoder

    hf_config = read_hf_config(config_dir)
    spec = spec_from_hf_config(hf_config)
    d = spec.head_dim
    with torch.device("meta"):  # the exact parameter count of our decoder, without allocating it
        params = sum(p.numel() for p in build_decoder(hf_config).parameters())
    embedding = spec.vocab_size * spec.hidden_size
    kv_dtype_bytes = 2 if str(manifest.get("kv_dtype", manifest.get("dtype", "float32"))) in ("float16", "fp16", "bfloat16") else 4
    per_layer_kv = 2 * spec.num_kv_heads * d * kv_dtype_bytes
    n_local = sum(spec.layer_is_local) if spec.sliding_window else 0
    return ArtifactFacts(
        target=str(manifest.get("target", "?")), size_bytes=size, params=params, embedding_params=embedding,
        tied=spec.tie_embeddings, layers=spec.num_layers, heads=spec.num_heads, head_dim=d,
        kv_bytes_per_position=per_layer_kv * (spec.num_layers - n_local), local_kv_bytes=per_layer_kv * n_local,
        window=spec.sliding_window if n_local else None,
        context_length=int(manifest.get("context_length", 512)))


def estimate(profile: Profile, facts: ArtifactFacts, prompt_tokens: int, decode_tokens: int = 32,
             batch: int = 1) -> dict:
    """Roofline figures for one artifact on one device (peak bandwidth and compute: a speed ceiling)."""
    bw = profile.bandwidth_gbs * 1e9
    flops = profile.compute_gflops * 1e9
    # prefill: weights stream once per chunk; flops grow with batch x tokens
    prefill_s = max(facts.weight_bytes_per_token / bw,
                    batch * (prompt_tokens * facts.flops_per_token(prompt_tokens // 2)) / flops)
    mid = prompt_tokens + decode_tokens // 2  # the average context a decode step attends over
    step_s = max((facts.weight_bytes_per_token + batch * facts.kv_bytes_read(mid)) / bw,
                 batch * facts.flops_per_token(mid) / flops)
    kv_full = facts.kv_bytes_read(facts.context_length) * batch
    return {
        "runner": "estimated",
        "ttft_ms": prefill_s * 1e3,
        "decode_tok_s": batch / step_s,
        # lower bound: weights + full static KV cache; the runtime's own overhead is not known here
        "peak_memory_mb": (facts.size_bytes + kv_full) / 1e6,
        "artifact_mb": facts.size_bytes / 1e6,  # model files only; check replaces it with the folder's size
        "bound": "memory" if (facts.weight_bytes_per_token / bw) >= facts.flops_per_token(mid) / flops else "compute",
        "basis": f"roofline on {profile.bandwidth_gbs:g} GB/s, {profile.compute_gflops:g} GFLOP/s (peak figures: "
                 "a ceiling on speed); memory = weights + KV cache, runtime overhead not included",
    }


def describe_profiles(profiles: dict[str, Profile]) -> str:
    return json.dumps({n: p.as_dict() for n, p in profiles.items()}, indent=2)
