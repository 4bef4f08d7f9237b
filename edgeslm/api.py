"""The Python API: what the CLI verbs call, for build scripts and notebooks. Keyword-only beyond
the first argument; each call returns a typed result (results.py) or raises EdgeSLMError (bad
input) / CheckFailed (a failed check, where the call is asked to raise).

    import edgeslm
    art = edgeslm.export("smollm2-135m", target="onnx", scheme="q4g32-rtn", out="x")
    edgeslm.verify(art).passed
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeSLMError
from .results import Artifact, Checkpoint, CheckReport, DeployReport, VerifyReport


def load(model=None, *, dtype: str = "fp32", allow_pickle: bool = False):
    """An HF folder, a .gguf, a quantized checkpoint or 'smollm2-135m' -> (Decoder, tokenizer)."""
    from .loading import load_model, torch_dtype

    decoder, tokenizer, _ = load_model(model, dtype=torch_dtype(dtype), allow_pickle=allow_pickle)
    return decoder, tokenizer


def quantize(model, *, scheme: str, out, calibration: str | None = None, samples: int | None = None,
             force: bool = False, allow_pickle: bool = False, progress: bool = True) -> Checkpoint:
    from .quantizer import quantize_folder
    from .schemes import CALIBRATION_SAMPLES, DEFAULT_CALIBRATION, get_scheme

    facts = quantize_folder(model, get_scheme(scheme), out, calibration or DEFAULT_CALIBRATION,
                            samples or CALIBRATION_SAMPLES, progress=progress, force=force, allow_pickle=allow_pickle)
    return Checkpoint(Path(out), scheme, facts)


def export(model, *, target: str, out, scheme: str = "f32", force: bool = False, context: int | None = None,
           prefill_chunk: int = 64, steps: int | None = None, verify: bool = True, allow_pickle: bool = False,
           progress: bool = True, accuracy_level: int | None = None) -> Artifact:
    """Exports and (by default) verifies; a failed bound raises CheckFailed, with the folder written.
    accuracy_level: onnx only, MatMulNBits' (0 exact fp32, 4 int8 activations); None: the target's default."""
    from .exporter import export_artifact

    options = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    manifest = export_artifact(model, target, scheme, Path(out), force=force, context=context,
                               prefill_chunk=prefill_chunk, steps=steps, verify=verify, progress=progress,
                               allow_pickle=allow_pickle, options=options)
    return Artifact(Path(out), manifest["target"], manifest["scheme"], manifest)


def _folder(artifact) -> Path:
    return artifact.folder if isinstance(artifact, Artifact) else Path(artifact)


def verify(artifact, *, steps: int | None = None, ppl_tokens: int | None = None, reference=None,
           allow_pickle: bool = False, progress: bool = True) -> VerifyReport:
    """Re-hashes and re-runs an artifact against its reference; never raises for a failed bound."""
    from .parity import verify_folder

    figures = verify_folder(_folder(artifact), steps=steps, ppl_count=ppl_tokens, progress=progress,
                            raise_on_failure=False, reference=reference, allow_pickle=allow_pickle)
    return VerifyReport(bool(figures["passed"]), list(figures["failures"]), figures)


def check_counts(decode_tokens: int, runs: int, warmup: int):
    if decode_tokens < 2:
        raise EdgeSLMError("--decode-tokens must be at least 2 (one prefill token + one decode step)")
    if runs < 1 or warmup < 0:
        raise EdgeSLMError("--runs must be >= 1 and --warmup >= 0")


def open_artifacts(artifacts) -> list[tuple[Path, dict]]:
    """Artifact folders (or Artifacts) -> (folder, manifest), each re-hashed against its manifest."""
    from .artifact import read_manifest, require_hashes

    out = []
    for a in artifacts:
        folder = _folder(a)
        if not folder.is_dir():
            raise EdgeSLMError(f"{folder} is not a folder")
        manifest = read_manifest(folder)
        if "target" not in manifest:
            raise EdgeSLMError(f"{folder}/manifest.json does not name its target")
        require_hashes(folder, manifest)
        out.append((folder, manifest))
    return out


def check(artifacts, *, devices, budget=None, allow_estimates: bool = False, profiles=(), decode_tokens: int = 32,
          runs: int = 5, warmup: int = 1, progress: bool = True) -> CheckReport:
    """Times each artifact on each device and judges the budgets (latency.VERDICTS)."""
    from tqdm.auto import tqdm

    from .devices import budgets_for, get_profile, load_budget_file
    from .latency import figures_for, judge, verdicts_pass

    artifacts = [artifacts] if isinstance(artifacts, (str, Path, Artifact)) else list(artifacts)
    devices = [devices] if isinstance(devices, str) else list(devices)
    check_counts(decode_tokens, runs, warmup)
    # every input is validated before anything is timed
    profiles = [get_profile(name, profiles) for name in devices]
    overrides = load_budget_file(budget) if budget else None
    opened = open_artifacts(artifacts)
    for folder, manifest in opened:
        for profile in profiles:
            prompt = int(budgets_for(profile, overrides)["prompt_tokens"])
            context = int(manifest.get("context_length") or 0)
            if context and prompt + decode_tokens > context:
                raise EdgeSLMError(f"{folder}: prompt_tokens {prompt} (device {profile.name}) + {decode_tokens} decode "
                                   f"tokens exceed the artifact's context of {context}; lower prompt_tokens in the "
                                   f"budget file or --decode-tokens")

    results = []
    pairs = [(a, p) for a in opened for p in profiles]
    for (folder, manifest), profile in tqdm(pairs, desc="check", unit="pair", disable=not progress or len(pairs) < 2):
        budgets = budgets_for(profile, overrides)
        prompt = int(budgets["prompt_tokens"])
        for r in figures_for(folder, manifest, profile, prompt, decode_tokens, runs, warmup):
            results.append({"artifact": str(folder), "target": manifest["target"], "device": profile.name,
                            "device_kind": profile.kind, "prompt_tokens": prompt, "decode_tokens": decode_tokens,
                            "runs": runs if r["measured"] else None, **r, "checks": judge(r, budgets)})
    rows = [c for r in results for c in r["checks"]]
    counts = {v: sum(c["verdict"] == v for c in rows) for v in ("pass", "fail", "unverified", "reported")}
    return CheckReport(verdicts_pass(rows, allow_estimates), counts, allow_estimates, results)


def deploy(recipe=None, *, out, scheme: str | None = None, targets=None, devices=None,
           allow_estimates: bool | None = None, progress: bool = True) -> DeployReport:
    """The main job from a recipe file (or the defaults), with optional overrides."""
    from .pipeline import read_recipe, run_deploy

    r = read_recipe(recipe)
    for key, value in (("scheme", scheme), ("targets", targets), ("devices", devices),
                       ("allow_estimates", allow_estimates)):
        if value is not None:
            setattr(r, key, value)
    report = run_deploy(r, Path(out), progress=progress)
    return DeployReport(bool(report["ok"]), Path(out), report)
