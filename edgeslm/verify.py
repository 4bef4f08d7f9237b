"""Verification shared by every target: is the artifact the same function as the reference decoder?

`verify_folder(folder)` does, for any artifact folder with a manifest:
  1. re-checks every file's sha256 against manifest.json;
  2. loads the reference decoder from the manifest's reference folder (the float model, or the
     quantized checkpoint the artifact was exported from) and the artifact in its own runtime
     (Target.load -> Runner);
  3. greedy decoding of a fixed prompt for N steps (N >= 3x any sliding window, so ring buffers wrap
     several times): the reference decodes freely; the artifact is fed the reference's tokens
     (teacher forcing), so its logits are compared at every step on the same history. Reported:
     max and mean |logit diff|, greedy agreement (steps where the reference's top-1 / top-2 margin
     lies within twice the measured logit error are counted as ties, not disagreements), and how many steps
     the artifact's own free-running greedy output matches the reference's;
  4. perplexity on the Brown test split (fixed windows, evaluate.py) of artifact and reference;
  5. bounds from Target.parity_bounds(scheme); a failed bound raises CheckFailed (exit 1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .artifact import check_hashes, read_manifest
from .errors import CheckFailed, EdgeSLMError

# A fixed prompt; long enough to span several prefill chunks of tiny test exports.
PROMPT_TEXT = (
    "The committee met on Tuesday to review the budget of the city library, and after a long "
    "discussion about the reading rooms, the members agreed that"
)
PPL_TOKENS = 2048
PPL_CONTEXT = 512


def prompt_ids(tokenizer, vocab: int, max_tokens: int) -> torch.Tensor:
    """The fixed prompt as [1, T] ids (fixed pseudo-random ids when there is no tokenizer)."""
    if tokenizer is not None:
        ids = tokenizer(PROMPT_TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    else:
        ids = torch.arange(1, 41) * 7919 % vocab
    return ids[:max_tokens].view(1, -1).long()


def default_steps(spec) -> int:
    window = spec.sliding_window if spec.has_local_layers else 0
    return max(64, 3 * (window or 0))


def ppl_tokens(tokenizer, context: int, count: int) -> tuple[torch.Tensor, str]:
    from .data import load_eval_text
    from .evaluate import eval_tokens

    if tokenizer is None:
        raise EdgeSLMError("the artifact has no tokenizer; perplexity needs one")
    return eval_tokens(tokenizer, load_eval_text("brown:test"), count), "brown:test"


@torch.no_grad()
def teacher_forced_logits(runner, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The artifact's logits [steps, V] when fed the reference's greedy tokens."""
    runner.reset()
    last = runner.prefill(prompt, 0)[0, -1]
    out = []
    for step in range(tokens.numel()):
        out.append(last.float())
        if step + 1 < tokens.numel():
            last = runner.decode(int(tokens[step]), prompt.shape[1] + step)
    return torch.stack(out)


def compare_greedy(ref_tokens, ref_logits, art_logits) -> dict:
    """A step where the artifact's argmax differs is a tie (not a disagreement) only when the
    reference's margin between the two tokens is within twice that step's measured logit error,
    i.e. the two runtimes' rounding alone can flip it (e.g. logits saturated by a final softcap)."""
    diff = (art_logits - ref_logits).abs()
    art_top = art_logits.argmax(-1)
    disagree, ties = [], 0
    for i in range(ref_tokens.numel()):
        if int(art_top[i]) == int(ref_tokens[i]):
            continue
        margin = float(ref_logits[i, ref_tokens[i]] - ref_logits[i, art_top[i]])
        if margin <= 2 * float(diff[i].max()):
            ties += 1
        else:
            disagree.append(i)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "greedy_agree": ref_tokens.numel() - len(disagree) - ties,
        "greedy_ties": ties,
        "greedy_disagree": len(disagree),
        "first_disagreement": disagree[0] if disagree else None,
    }


def cached_reference_perplexity(reference_key: str | None, compute, data: str, count: int, context: int) -> float:
    """The reference's perplexity is the same for every target: computed once per reference folder
    (keyed by its files' names, sizes and mtimes) and kept in <cache>/verify/."""
    import hashlib
    import json

    from .loading import cache_dir

    if reference_key is None:
        return compute()["perplexity"]
    folder = Path(reference_key)
    h = hashlib.sha256(f"{folder.resolve()}|{data}|{count}|{context}".encode())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache_dir() / "verify" / f"ppl-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())["perplexity"]
    value = compute()["perplexity"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(path)}")
    tmp.write_text(json.dumps({"perplexity": value, "reference": str(folder), "data": data, "tokens": count,
                               "context": context}))
    tmp.replace(path)
    return value


def verify_runner(runner, reference, tokenizer, bounds: dict, context: int, steps: int | None = None,
                  ppl_count: int | None = None, progress: bool = True, reference_key: str | None = None) -> dict:
    """Compares a loaded Runner with the reference Decoder; returns the figures and bound checks."""
    from .evaluate import decoder_logits_fn, perplexity
    from .model import generate_greedy
    from .ops import reference_only

    spec = reference.spec
    steps = steps or default_steps(spec)
    window = spec.sliding_window if spec.has_local_layers else None
    if window and steps < 3 * window:
        raise EdgeSLMError(f"--steps {steps} is below 3x the sliding window ({window}); use at least {3 * window}")
    prompt = prompt_ids(tokenizer, spec.vocab_size, max(8, context // 4))
    if prompt.shape[1] + steps > context:
        raise EdgeSLMError(f"prompt ({prompt.shape[1]}) + {steps} steps exceed the artifact's context ({context})")
    result = {"runtime": runner.runtime, "prompt_tokens": prompt.shape[1], "steps": steps, "sliding_window": window}
    with reference_only():
        ref_tokens, ref_logits = generate_greedy(reference, prompt, steps, max_len=context)
        ref_tokens, ref_logits = ref_tokens[0], ref_logits[0]
        t0 = time.perf_counter()
        art_logits = teacher_forced_logits(runner, prompt, ref_tokens)
        result["artifact_decode_s"] = time.perf_counter() - t0
        result.update(compare_greedy(ref_tokens, ref_logits, art_logits))
        free_tokens, _ = runner.generate_greedy(prompt, steps)
        same = (free_tokens == ref_tokens).long()
        result["free_running_identical_prefix"] = int(same.cumprod(0).sum())

        if tokenizer is not None:
            ppl_context = min(PPL_CONTEXT, context)
            count = ppl_count or min(PPL_TOKENS, 16 * ppl_context)
            ids, data = ppl_tokens(tokenizer, ppl_context, count)
            ref_ppl = cached_reference_perplexity(
                reference_key, lambda: perplexity(decoder_logits_fn(reference), ids, ppl_context, progress=progress),
                data, int(ids.numel()), ppl_context)
            art_ppl = perplexity(lambda x: runner.score(x), ids, ppl_context, progress=progress)["perplexity"]
            result.update(ppl_data=data, ppl_tokens=int(ids.numel()), ppl_context=ppl_context,
                          ppl_reference=ref_ppl, ppl_artifact=art_ppl, ppl_rel_diff=art_ppl / ref_ppl - 1)
    result["bounds"] = bounds
    result["failures"] = bound_failures(result, bounds)
    result["passed"] = not result["failures"]
    return result


def bound_failures(r: dict, bounds: dict) -> list[str]:
    out = []
    if bounds.get("max_abs_logit") is not None and not r["max_abs_logit_diff"] <= bounds["max_abs_logit"]:
        out.append(f"max |logit diff| {r['max_abs_logit_diff']:.3g} > {bounds['max_abs_logit']:.0e}")
    if bounds.get("tokens_identical") and r["greedy_disagree"]:
        out.append(f"greedy tokens disagree at {r['greedy_disagree']} of {r['steps']} steps "
                   f"(first at step {r['first_disagreement']})")
    if bounds.get("ppl_rel") is not None:
        if "ppl_rel_diff" not in r:
            out.append("perplexity not measured (no tokenizer)")
        elif not abs(r["ppl_rel_diff"]) <= bounds["ppl_rel"]:
            out.append(f"perplexity {r['ppl_artifact']:.3f} vs reference {r['ppl_reference']:.3f} "
                       f"({100 * r['ppl_rel_diff']:+.2f}%) is outside ±{100 * bounds['ppl_rel']:.1f}%")
    return out


def load_reference(manifest: dict):
    """The reference Decoder (and tokenizer) named by a manifest."""
    from .loading import load_model, load_tokenizer

    ref = Path(manifest["reference"])
    if not ref.exists():
        raise EdgeSLMError(f"the reference folder {ref} named in the manifest is missing; re-export or re-quantize")
    model, _, _ = load_model(ref, with_tokenizer=False)
    try:
        tok = load_tokenizer(ref)
    except EdgeSLMError:
        tok = None
    return model, tok


def artifact_tokenizer(folder: Path):
    from .loading import load_tokenizer

    tdir = Path(folder) / "tokenizer"
    return load_tokenizer(tdir) if tdir.is_dir() else None


def verify_folder(folder, steps: int | None = None, ppl_count: int | None = None, progress: bool = True,
                  manifest: dict | None = None, raise_on_failure: bool = True) -> dict:
    """Full verification of an artifact folder (see the module docstring)."""
    from .schemes import get_scheme
    from .targets.registry import get_target

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    problems = check_hashes(folder, manifest)
    if problems:
        raise CheckFailed(f"{folder}: {len(problems)} file(s) fail the manifest: {'; '.join(problems[:3])}")
    target = get_target(manifest["target"])
    reason = target.unavailable_reason()
    if reason:
        raise EdgeSLMError(f"cannot run {manifest['target']} artifacts here: {reason}")
    scheme = get_scheme(manifest["scheme"])
    reference, ref_tok = load_reference(manifest)
    tokenizer = artifact_tokenizer(folder) or ref_tok
    runner = target.load(folder, manifest)
    try:
        result = verify_runner(runner, reference, tokenizer, target.parity_bounds(scheme),
                               manifest["context_length"], steps, ppl_count, progress, manifest["reference"])
    finally:
        runner.close()
    # target-specific facts (Core ML ops/states/weight dtypes, WebGPU shaders...); a quantized Core ML
    # package that still reads a float weight for a linear layer is a failure
    result["inspect"] = target.inspect(folder, manifest)
    if result["inspect"].get("quantized_float_weight_failure"):
        result["failures"].append("a quantized package still holds float weights for linear layers")
        result["passed"] = False
    result.update(folder=str(folder), target=manifest["target"], scheme=scheme.name, model=manifest.get("model"),
                  hashes_checked=len(manifest["files"]), artifact_bytes=sum(f["bytes"] for f in manifest["files"].values()))
    if manifest.get("parameters"):
        result["bytes_per_parameter"] = result["artifact_bytes"] / manifest["parameters"]
    if raise_on_failure and not result["passed"]:
        raise CheckFailed(f"{folder}: " + "; ".join(result["failures"]))
    return result


def render(r: dict) -> str:
    from .cli.common import human_bytes, table

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if not math.isnan(v) else "nan"
        return str(v)

    rows = [
        ["files (sha256)", f"{r['hashes_checked']} ok", ""],
        ["runtime", r["runtime"], ""],
        ["max |logit diff|", fmt(r["max_abs_logit_diff"]),
         f"<= {r['bounds']['max_abs_logit']:.0e}" if r["bounds"].get("max_abs_logit") is not None else "reported"],
        ["mean |logit diff|", fmt(r["mean_abs_logit_diff"]), ""],
        [f"greedy tokens ({r['steps']} steps, teacher-forced)",
         f"{r['greedy_agree']} agree, {r['greedy_ties']} ties, {r['greedy_disagree']} disagree",
         "all agree" if r["bounds"].get("tokens_identical") else "reported"],
        ["free-running identical prefix", f"{r['free_running_identical_prefix']}/{r['steps']}", ""],
    ]
    if "ppl_artifact" in r:
        rows.append([f"perplexity ({r['ppl_data']}, {r['ppl_tokens']} tok, ctx {r['ppl_context']})",
                     f"{r['ppl_artifact']:.3f} vs {r['ppl_reference']:.3f} ({100 * r['ppl_rel_diff']:+.2f}%)",
                     f"within ±{100 * r['bounds']['ppl_rel']:.1f}%" if r["bounds"].get("ppl_rel") is not None else ""])
    size = human_bytes(r["artifact_bytes"])
    if "bytes_per_parameter" in r:
        size += f" ({r['bytes_per_parameter']:.3f} B/param)"
    rows.append(["artifact size", size, ""])
    for key, value in (r.get("inspect") or {}).items():
        if isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values()):
            shown = ", ".join(f"{k} {human_bytes(v) if 'shader' in key or 'shard' in key else v}"
                              for k, v in list(value.items())[:12])
            rows.append([key, shown + (" ..." if len(value) > 12 else ""), ""])
        elif isinstance(value, (str, int, float, bool)) and value is not None:
            rows.append([key, fmt(value), ""])
    head = f"{r['folder']}: {r['target']} / {r['scheme']} / {r.get('model')}"
    verdict = "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
    return head + "\n" + table(rows, ["check", "value", "bound"]) + "\n" + verdict
