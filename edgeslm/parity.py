"""Verification shared by every target: is the artifact the same function as the reference decoder?

`verify_folder(folder)` does, for any artifact folder with a manifest:
  1. re-checks every file's sha256 against manifest.json;
  2. loads the reference decoder from the manifest's reference folder (the float model, or the
     quantized checkpoint the artifact was exported from) and the artifact in its own runtime
     (Target.load -> Runner);
  3. greedy decoding of a fixed prompt for N steps. With sliding-window layers the prompt is longer
     than the window and decoding continues past it, so the ring buffers wrap both in prefill and in
     decode. The reference decodes freely; the artifact is fed the reference's tokens (teacher
     forcing), so its logits are compared at every step on the same history. Reported: max and mean
     |logit diff|, greedy agreement (a step is a tie, not a disagreement, only when the reference's
     top-1 / top-2 margin is below TIE_MARGIN, a fixed epsilon, or below the rounding noise of the
     runtime's arithmetic as simulated at export; never a function of the error being judged), and
     how many steps the artifact's own free-running greedy output matches the reference's;
  4. perplexity on the Brown test split (fixed windows, evaluate.py) of artifact and reference;
  5. bounds: the ones the exporter derived and recorded in the manifest ("parity_bounds"), else
     Target.parity_bounds(scheme); a failed bound raises CheckFailed (exit 1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .artifact import check_hashes, read_manifest
from .errors import CheckFailed, EdgeSLMError
from .targets.base import Runner

# A fixed prompt; long enough to span several prefill chunks of tiny test exports.
PROMPT_TEXT = (
    "The committee met on Tuesday to review the budget of the city library, and after a long "
    "discussion about the reading rooms, the members agreed that"
)
PPL_TOKENS = 2048
PPL_CONTEXT = 512
DEFAULT_STEPS = 64
MIN_STEPS = 8  # the fewest greedy steps a verify may take
# Two greedy candidates closer than this (fp32 logits) are a tie that any reassociation may flip.
TIE_MARGIN = 1e-4


def prompt_ids(tokenizer, vocab: int, length: int) -> torch.Tensor:
    """The fixed prompt as [1, length] ids, its text repeated as needed (fixed pseudo-random ids when
    there is no tokenizer)."""
    if tokenizer is not None:
        base = tokenizer(PROMPT_TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    else:
        base = torch.arange(1, 41) * 7919 % vocab
    ids = base.repeat(-(-length // base.numel()))[:length]
    return ids.view(1, -1).long()


def plan(spec, context: int, steps: int | None = None) -> tuple[int, int]:
    """-> (prompt tokens, greedy steps) for an artifact of `context` positions.

    Without sliding windows: a short prompt, then DEFAULT_STEPS (fewer if the context is smaller).
    With them: a prompt past the window (so prefill wraps the ring), then decoding further past it.
    Raises EdgeSLMError, naming the option to change, when the context cannot hold MIN_STEPS past
    the window or the requested --steps; export calls this before any work."""
    if steps is not None and steps < 1:
        raise EdgeSLMError(f"--steps must be at least 1 (got {steps})")
    window = spec.sliding_window if spec.has_local_layers else None
    if window and window >= context:
        raise EdgeSLMError(f"--context {context} does not exceed the sliding window ({window}), so no test can pass "
                           f"the window: use --context {2 * window} or more")
    shortest = window + 1 if window else max(8, min(context // 4, 64))
    room = context - shortest
    if steps is None:
        steps = min(DEFAULT_STEPS, room)
        if steps < MIN_STEPS:
            raise EdgeSLMError(f"--context {context} leaves {max(room, 0)} greedy steps after a {shortest}-token prompt"
                               f"{' past the sliding window' if window else ''}; use --context {shortest + MIN_STEPS} "
                               f"or more")
    elif steps > room:
        raise EdgeSLMError(f"a {shortest}-token prompt{' past the sliding window' if window else ''} + {steps} steps "
                           f"exceed the artifact's context ({context}): use --context at least {shortest + steps}, "
                           f"or fewer --steps")
    prompt = max(shortest, min(window + window // 2 + 1, context - steps)) if window else shortest
    return prompt, steps


def default_context(spec, requested: int | None = None) -> int:
    """The export context: `requested`, else 512, raised to 2x the sliding window so that verify can
    cross the window (capped by the model's own maximum)."""
    if requested is not None:
        return requested
    window = spec.sliding_window if spec.has_local_layers else 0
    context = max(512, 2 * (window or 0))
    return min(context, spec.max_position) if spec.max_position else context


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


def compare_greedy(ref_tokens, ref_logits, art_logits, tie_margin: float = TIE_MARGIN) -> dict:
    """A step where the artifact's argmax differs is a tie (not a disagreement) only when the
    reference's margin between the two tokens is below tie_margin: TIE_MARGIN, or the rounding
    noise of the runtime's arithmetic as simulated at export (bounds["tie_margin"]), never the
    artifact's own measured error."""
    diff = (art_logits - ref_logits).abs()
    art_top = art_logits.argmax(-1)
    disagree, ties = [], 0
    for i in range(ref_tokens.numel()):
        if int(art_top[i]) == int(ref_tokens[i]):
            continue
        margin = float(ref_logits[i, ref_tokens[i]] - ref_logits[i, art_top[i]])
        if margin < tie_margin:
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


def free_running(tokens, ref_tokens, ref_logits, tie_margin: float = TIE_MARGIN) -> dict:
    """How long the artifact's own greedy output stays the reference's. identical_prefix: steps
    before the first difference. checked_prefix: the same, except that a first difference at a tie
    (the reference's margin between the two tokens below tie_margin) ends the comparison without a
    fault: from there the two histories differ legitimately, so every step counts as agreeing."""
    same = (tokens == ref_tokens).long()
    prefix = int(same.cumprod(0).sum())
    checked = prefix
    if prefix < tokens.numel():
        margin = float(ref_logits[prefix, ref_tokens[prefix]] - ref_logits[prefix, tokens[prefix]])
        checked = tokens.numel() if margin < tie_margin else prefix
    return {"free_running_identical_prefix": prefix, "free_running_checked_prefix": checked}


def reference_greedy(reference, prompt, steps: int, context: int, reference_key: str | None = None):
    """The reference's greedy tokens [steps] and logits [steps, V] for a prompt: computed once per
    reference folder (by content) and prompt, and kept in <cache>/verify/, so that export, its
    derived bounds and every later verify of the same reference decode it once."""
    from safetensors.torch import load_file, save_file

    from .artifact import content_key
    from .loading import cache_dir
    from .model import generate_greedy

    path = None
    if reference_key is not None:
        folder = Path(reference_key)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json"))
        key = content_key(*files, prompt.tolist(), steps, context)
        path = cache_dir() / "verify" / f"greedy-{key[:16]}.safetensors"
        if path.is_file():
            cached = load_file(path)
            return cached["tokens"], cached["logits"]
    tokens, logits = generate_greedy(reference, prompt, steps, max_len=context)
    tokens, logits = tokens[0].contiguous(), logits[0].float().contiguous()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(path)}")
        save_file({"tokens": tokens, "logits": logits}, tmp)
        tmp.replace(path)
    return tokens, logits


def cached_reference_perplexity(reference_key: str | None, compute, data: str, count: int, context: int,
                                prefix=()) -> float:
    """The reference's perplexity is the same for every target: computed once per reference folder
    (keyed by the contents of its weights and config, and the tool versions) and kept in <cache>/verify/."""
    import json

    from .artifact import content_key
    from .loading import cache_dir

    if reference_key is None:
        return compute()["perplexity"]
    folder = Path(reference_key)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json"))
    key = content_key(*files, data, count, context, list(prefix))
    path = cache_dir() / "verify" / f"ppl-{key[:16]}.json"
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
    from .evaluate import decoder_logits_fn, perplexity, text_prefix
    from .ops import reference_only

    spec = reference.spec
    prompt_len, steps = plan(spec, context, steps)
    window = spec.sliding_window if spec.has_local_layers else None
    prompt = prompt_ids(tokenizer, spec.vocab_size, prompt_len)
    result = {"runtime": runner.runtime, "prompt_tokens": prompt.shape[1], "steps": steps, "sliding_window": window}
    with reference_only():
        ref_tokens, ref_logits = reference_greedy(reference, prompt, steps, context, reference_key)
        t0 = time.perf_counter()
        art_logits = teacher_forced_logits(runner, prompt, ref_tokens)
        result["artifact_decode_s"] = time.perf_counter() - t0
        tie = bounds.get("tie_margin") or TIE_MARGIN
        result.update(compare_greedy(ref_tokens, ref_logits, art_logits, tie))
        free_tokens, _ = runner.generate_greedy(prompt, steps)
        result.update(free_running(free_tokens, ref_tokens, ref_logits, tie))

        if tokenizer is not None:
            ppl_context = min(PPL_CONTEXT, context)
            count = ppl_count or min(PPL_TOKENS, 16 * ppl_context)
            ids, data = ppl_tokens(tokenizer, ppl_context, count)
            prefix = text_prefix(tokenizer)
            ref_ppl = cached_reference_perplexity(
                reference_key, lambda: perplexity(decoder_logits_fn(reference), ids, ppl_context, progress=progress,
                                                  prefix=prefix),
                data, int(ids.numel()), ppl_context, prefix)
            art_ppl = perplexity(lambda x: runner.score(x), ids, ppl_context, progress=progress,
                                 prefix=prefix)["perplexity"]
            result.update(ppl_data=data, ppl_tokens=int(ids.numel()), ppl_context=ppl_context,
                          ppl_reference=ref_ppl, ppl_artifact=art_ppl, ppl_rel_diff=art_ppl / ref_ppl - 1)
    result["bounds"] = bounds
    result["failures"] = bound_failures(result, bounds)
    result["passed"] = not result["failures"]
    return result


class DecoderRunner(Runner):
    """The reference Decoder behind the Runner interface, so that a simulation of a runtime's
    arithmetic goes through the same greedy loops as the artifact."""

    runtime = "edgeslm reference decoder"

    def __init__(self, model, context: int):
        self.model, self.context = model, context
        self.reset()

    def reset(self):
        self.cache = self.model.new_cache(1, self.context)

    @torch.no_grad()
    def prefill(self, tokens, start: int):
        was, self.model.inplace_cache = self.model.inplace_cache, True
        try:
            logits, self.cache = self.model(tokens, start, self.cache)
        finally:
            self.model.inplace_cache = was
        return logits.float()

    def decode(self, token: int, pos: int):
        return self.prefill(torch.tensor([[token]]), pos)[0, -1]


def derive_bounds(reference, simulate, tokenizer, context: int, basis: str, steps: int | None = None,
                  margin: float = 2.0, ppl_rel: float = 0.01, reference_key: str | None = None) -> dict:
    """Bounds for a runtime whose arithmetic differs from the reference's, from a simulation of it.

    simulate(model) is a context manager (simulate.simulated) under which `reference` computes as
    the runtime does. On verify's own prompt and steps, the simulation's max |logit diff| from the
    reference, times `margin`, bounds the artifact's; that diff itself is the tie margin (two
    tokens closer than the arithmetic's own noise may come out either way); the simulation's
    teacher-forced agreement, less a slack of one step in 16 (at least 2), and half its identical
    free-running prefix bound the artifact's tokens, as shares of the steps (verify may run another
    number of steps)."""
    from .ops import reference_only

    prompt_len, steps = plan(reference.spec, context, steps)
    prompt = prompt_ids(tokenizer, reference.spec.vocab_size, prompt_len)
    with reference_only(), torch.no_grad():
        ref_tokens, ref_logits = reference_greedy(reference, prompt, steps, context, reference_key)
        with simulate(reference) as simulation:
            runner = DecoderRunner(simulation, context)
            sim_logits = teacher_forced_logits(runner, prompt, ref_tokens)
            tie = max(TIE_MARGIN, float((sim_logits - ref_logits).abs().max()))  # the arithmetic's own noise
            sim = compare_greedy(ref_tokens, ref_logits, sim_logits, tie)
            free, _ = runner.generate_greedy(prompt, steps)
    prefix = free_running(free, ref_tokens, ref_logits, tie)["free_running_checked_prefix"]
    agree = sim["greedy_agree"] + sim["greedy_ties"]
    return {
        "max_abs_logit": max(1e-3, margin * sim["max_abs_logit_diff"]),
        "tie_margin": tie,
        "tokens_identical": False,
        "min_greedy_agree_rate": max(0.0, (agree - max(2, steps // 16)) / steps),
        "free_running_min_prefix_rate": prefix / 2 / steps,
        "ppl_rel": ppl_rel,
        "basis": f"{basis}; simulated on the reference: max |logit diff| {sim['max_abs_logit_diff']:.3g} "
                 f"(bound x{margin:g}), {agree}/{steps} greedy tokens agree, free-running identical for {prefix}",
    }


def bound_failures(r: dict, bounds: dict) -> list[str]:
    """The bounds that r misses, each as one line naming the check."""
    out = []
    if bounds.get("max_abs_logit") is not None and not r["max_abs_logit_diff"] <= bounds["max_abs_logit"]:
        out.append(f"max |logit diff| {r['max_abs_logit_diff']:.3g} > {bounds['max_abs_logit']:.0e}")
    if bounds.get("tokens_identical") and r["greedy_disagree"]:
        out.append(f"greedy tokens disagree at {r['greedy_disagree']} of {r['steps']} steps "
                   f"(first at step {r['first_disagreement']})")
    agree, prefix, steps = r["greedy_agree"] + r["greedy_ties"], r["free_running_checked_prefix"], r["steps"]
    need = bounds.get("min_greedy_agree")
    if bounds.get("min_greedy_agree_rate") is not None:
        need = max(need or 0, math.ceil(bounds["min_greedy_agree_rate"] * steps - 1e-9))
    if need is not None and agree < need:
        out.append(f"greedy tokens agree at {agree} of {steps} steps, fewer than {need}")
    if bounds.get("free_running_identical") and prefix < steps:
        out.append(f"free-running greedy output differs from step {prefix} of {steps}")
    need = bounds.get("free_running_min_prefix")
    if bounds.get("free_running_min_prefix_rate") is not None:
        need = max(need or 0, math.floor(bounds["free_running_min_prefix_rate"] * steps + 1e-9))
    if need is not None and prefix < need:
        out.append(f"free-running greedy output identical for {prefix} of {steps} steps, fewer than {need}")
    if bounds.get("ppl_rel") is not None:
        if "ppl_rel_diff" not in r:
            out.append("perplexity not measured (no tokenizer)")
        elif not abs(r["ppl_rel_diff"]) <= bounds["ppl_rel"]:
            out.append(f"perplexity {r['ppl_artifact']:.3f} vs reference {r['ppl_reference']:.3f} "
                       f"({100 * r['ppl_rel_diff']:+.2f}%) is outside ±{100 * bounds['ppl_rel']:.1f}%")
    return out


def load_reference(manifest: dict, reference=None, allow_pickle: bool = False):
    """The reference Decoder (and tokenizer): `reference` when given, else the manifest's."""
    from .loading import load_model, load_tokenizer

    ref = Path(reference or manifest["reference"])
    if not ref.exists():
        if reference:
            raise EdgeSLMError(f"--reference {ref} does not exist")
        raise EdgeSLMError(f"the reference folder {ref} named in the manifest is missing (an artifact copied from "
                           f"another machine?): pass --reference with the model or quantized checkpoint it was "
                           f"exported from ({manifest.get('model')}, scheme {manifest.get('scheme')})")
    model, _, _ = load_model(ref, with_tokenizer=False, allow_pickle=allow_pickle)
    try:
        tok = load_tokenizer(ref)
    except EdgeSLMError:
        tok = None
    return model, tok


def artifact_tokenizer(folder: Path):
    """The tokenizer that ships with an artifact: tokenizer/, else the folder's top (where a target
    whose runtime reads it there, as onnxruntime-genai does, writes it); None when there is none."""
    from .loading import load_tokenizer

    for candidate in (Path(folder) / "tokenizer", Path(folder)):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return load_tokenizer(candidate)
    return None


def parity_bounds(target, scheme, manifest: dict) -> dict:
    """The bounds the exporter derived and recorded, else the target's for the scheme."""
    return manifest.get("parity_bounds") or target.parity_bounds(scheme)


def verify_folder(folder, steps: int | None = None, ppl_count: int | None = None, progress: bool = True,
                  manifest: dict | None = None, raise_on_failure: bool = True, reference=None,
                  allow_pickle: bool = False) -> dict:
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
    reference_model, ref_tok = load_reference(manifest, reference, allow_pickle)
    tokenizer = artifact_tokenizer(folder) or ref_tok
    runner = target.load(folder, manifest)
    try:
        result = verify_runner(runner, reference_model, tokenizer, parity_bounds(target, scheme, manifest),
                               manifest["context_length"], steps, ppl_count, progress,
                               str(reference or manifest["reference"]))
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
    from .console import human_bytes, table

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if not math.isnan(v) else "nan"
        return str(v)

    b, steps = r["bounds"], r["steps"]

    def share(key):
        rate = b.get(f"{key}_rate")
        return f">= {rate * steps:.0f}" if rate is not None else (f">= {b[key]}" if b.get(key) is not None else None)

    rows = [
        ["files (sha256)", f"{r['hashes_checked']} ok", ""],
        ["runtime", r["runtime"], ""],
        ["max |logit diff|", fmt(r["max_abs_logit_diff"]),
         f"<= {b['max_abs_logit']:.3g}" if b.get("max_abs_logit") is not None else "reported"],
        ["mean |logit diff|", fmt(r["mean_abs_logit_diff"]), ""],
        [f"greedy tokens ({steps} steps, teacher-forced)",
         f"{r['greedy_agree']} agree, {r['greedy_ties']} ties, {r['greedy_disagree']} disagree",
         "all agree" if b.get("tokens_identical") else share("min_greedy_agree") or "reported"],
        ["free-running identical prefix", f"{r['free_running_identical_prefix']}/{steps}"
         + (" (then a tie)" if r["free_running_checked_prefix"] > r["free_running_identical_prefix"] else ""),
         "all" if b.get("free_running_identical") else share("free_running_min_prefix") or "reported"],
    ]
    if b.get("basis"):
        rows.append(["bounds from", b["basis"][:110], ""])
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
