"""Quantize once: a float Decoder -> the packed format of qformat.py, by RTN, GPTQ or AWQ.

Every method ends in the same tensors (int4 codes + fp16 scales [+ uint8 zeros], or int8 + scale),
so every target reads the one format; AWQ's per-channel input scales are folded into the preceding
norm or linear, so an AWQ checkpoint needs no extra runtime op.

 - rtn:  plain round-to-nearest on the grid of schemes.int4.int4_grid_rtn (the baseline).
 - gptq: layer by layer over calibration activations (inputs of each layer come from the already
         quantized layers before it), column-wise error feedback through the inverse Hessian
         (Frantar et al. 2022), columns in descending Hessian-diagonal order ("act order") with
         per-group scales fixed before the sweep, chosen by an activation-weighted clip search;
         by default (RECIPE) AWQ's input scales are searched and folded first, then GPTQ runs on
         the scaled linears.
 - awq:  per input channel scales s = mean|x|^a (Lin et al. 2023), a grid-searched on the output
         error of the linears sharing that input, folded into the norm / linear before them;
         then the same activation-weighted clip search and round-to-nearest.
Written here (not taken from AutoGPTQ/AutoAWQ) because those packages need CUDA builds and their
own packed layouts; this file is the algorithm only, over our Decoder and our format.

The tied embedding / lm_head table is int4 in every q4 scheme (see schemes/__init__.py for the choice and
its measured cost): for gptq it is quantized by GPTQ with the final normed hidden states' Hessian
(what the lm_head sees), and the row lookups read those codes; for awq its groups get the scale
search weighted by that Hessian and round-to-nearest codes. The scale search of every calibrated
grid is Recipe.scale_search (RECIPE: 14 ratios, then bf16-exact neighbours of each group's best).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import EdgeSLMError
from .model import linear_names
from .qformat import _parent, quantized_module
from .schemes import CALIBRATION_LENGTH, CALIBRATION_SAMPLES, DEFAULT_CALIBRATION  # noqa: F401 (re-exported)
from .schemes.int4 import scale_grid

CALIBRATED_RECIPE = "gptq-actorder-static-refine-embgptq/awq-grid10-refine/3"  # part of reference_folder's cache key
SCALE_GRID = "scales fp16 and bf16-exact"  # schemes.int4.scale_grid; part of reference_folder's cache key
CLIP_RATIOS = torch.linspace(1.0, 0.70, 13).tolist()
# every bf16-exact scale from 0.55x to 1.08x of the full-range one: bf16-exact values are 2**-8 to
# 2**-7 apart (relative), so a 0.0035 step lands on each of them at least once
GRID_RATIOS = torch.arange(1.08, 0.55, -0.0035).tolist()
# the same range at a 0.04 step, then each group's best scale moved by up to REFINE_STEPS bf16-exact
# values either way (2**-8..2**-7 apart, relative): the dense search's optimum at ~1/6 of its cost
REFINE_RATIOS = torch.linspace(1.08, 0.56, 14).tolist()
REFINE_STEPS = 6
AWQ_GRID = 10  # exponents 0, 0.1, ..., 0.9 of mean|x|
AWQ_TOKENS = 1024  # tokens the AWQ scale search evaluates (a subsample of the calibration set)


def calibration_tokens(tokenizer, source: str = DEFAULT_CALIBRATION, samples: int = CALIBRATION_SAMPLES,
                       length: int = CALIBRATION_LENGTH, seed: int | None = None) -> torch.Tensor:
    """Local text ('brown:train', or a .txt / .jsonl path) -> int64 [samples, length].

    seed None: the text's first samples*length tokens; an int: that many distinct windows drawn at
    random (window-aligned) from the whole text by a generator with that seed.
    A text shorter than samples*length gives fewer windows (at least one is needed)."""
    from .data import load_eval_text

    text = load_eval_text(source)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    available = ids.numel() // length
    n = min(samples, available)
    if n < 1:
        raise EdgeSLMError(f"calibration text {source} has {ids.numel()} tokens; at least {length} are needed")
    windows = ids[: available * length].view(available, length)
    if seed is None:
        return windows[:n]
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    return windows[pick.sort().values]


@dataclass(frozen=True)
class Recipe:
    """How the calibrated methods (gptq, awq) choose their int4 grids.

    scale_search: "grid" tries every bf16-exact group scale from 0.55x to 1.08x of the full-range
        one (GRID_RATIOS); "refine" tries 14 of them (REFINE_RATIOS), then the REFINE_STEPS
        bf16-exact scales on each side of each group's best; "ratios" tries the 13 shrinks of
        CLIP_RATIOS. Every way weighs the group's error by its block of the input Hessian (the
        layer's output error).
    embedding: the tied embedding / lm_head table by "gptq" (the final normed hidden states'
        Hessian, what the lm_head multiplies; row lookups read the same codes) or by "clip"
        (round-to-nearest with the scale search weighted by that Hessian).
    true_sequential: gptq only. True: each set of linears sharing an input (q/k/v, o, gate/up,
        down) is calibrated on inputs computed by the already quantized sets before it in the
        layer; False: every set's inputs come from the float layer.
    awq_scales: gptq only. True: AWQ's per-channel input scales are searched and folded first
        (as the awq method does), then GPTQ quantizes the scaled linears.
    layer_choice: gptq only. True: each set of linears sharing an input takes whichever of four
        grids has the least output error on the calibration inputs (sum over the set of
        d^T H d): scale-searched round-to-nearest, GPTQ, and each of those after AWQ's scales
        (where the set's input can take a fold). The error is measured on the inputs GPTQ fits.
    """

    scale_search: str = "refine"
    embedding: str = "gptq"
    true_sequential: bool = False
    awq_scales: bool = False
    layer_choice: bool = False


# what the schemes use (its repr is part of reference_folder's cache key); each choice measured by
# benchmarks/quality_levers.py over 3 calibration seeds: the refined scale search, the table by GPTQ
# and AWQ's scales before GPTQ lowered q4g32-gptq's perplexity; true-sequential and the per-layer
# choice of method did not
RECIPE = Recipe(awq_scales=True)


@torch.no_grad()
def quantize_model(model, scheme, calibration: torch.Tensor | None = None, progress: bool = True,
                   recipe: Recipe | None = None, chosen: dict | None = None):
    """In place: float linears and embedding -> int4/int8 modules holding the scheme's grid.

    calibration: int64 [samples, length] token windows, needed by gptq and awq.
    recipe: the calibrated methods' choices (default RECIPE).
    chosen: with recipe.layer_choice, filled with {linear name: the grid it took}."""
    if not scheme.quantized:
        return model.to(getattr(torch, scheme.float_dtype))
    scheme.check_shapes(model)  # a group size that does not divide some K, refused before any work
    model.float()
    # Each module is replaced by its quantized one as soon as its grid is known, which frees its
    # float weight: quantizing never holds more than the float model and one layer's work.
    if scheme.method == "rtn":
        for name in linear_names(model):
            _swap_in(model, name, scheme.rtn_grid(model.get_submodule(name).weight), scheme)
        table = model.embed_tokens.weight
        _swap_in(model, "embed_tokens", scheme.table_grid(table) or scheme.rtn_grid(table), scheme)
    elif scheme.method in ("gptq", "awq"):
        if calibration is None or calibration.numel() == 0:
            raise EdgeSLMError(f"{scheme.name} needs calibration text")
        _calibrated(model, scheme, calibration, progress, recipe or RECIPE, {} if chosen is None else chosen)
    else:
        raise EdgeSLMError(f"{scheme.name}: unknown quantization method {scheme.method!r}")
    return model


def _swap_in(model, name: str, grid, scheme):
    """Replaces the float module `name` by its quantized module holding `grid`."""
    parent, attr = _parent(model, name)
    module = quantized_module(getattr(parent, attr), scheme)
    scheme.fill(module, grid)
    setattr(parent, attr, module)


# ---------------------------------------------------------------- int4 grids with a clip search


def _group_params(w, group_size, symmetric, ratio):
    """Scales (and zeros) of every group of w [N, K] with the range shrunk by `ratio`."""
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    if symmetric:
        scale = scale_grid(g.abs().amax(-1) * ratio / 7.5).float()
        return scale, torch.full_like(scale, 8.0)
    lo, hi = g.amin(-1).clamp_max(0) * ratio, g.amax(-1).clamp_min(0) * ratio
    scale = scale_grid((hi - lo) / 15).float()
    return scale, torch.round(-lo / scale).clamp(0, 15)


def _quant_dequant(w, scale, zero, group_size):
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)
    return q.view(n, k), ((q - zero[..., None]) * scale[..., None]).view(n, k)


def _bf16_neighbour(scale, steps: int):
    """The bf16-exact value `steps` representable values above (below, if negative) each positive
    bf16-exact scale, kept on schemes.int4.scale_grid."""
    bits = scale.to(torch.bfloat16).view(torch.int16) + steps
    return scale_grid(bits.view(torch.bfloat16).float().clamp_min(2**-24)).float()


def clip_search(w, group_size, symmetric, hessian=None, ratios=None, refine: int = 0):
    """Per group, the range shrink (of `ratios`, default CLIP_RATIOS) that minimises the
    quantization error d^T H_g d, with H_g the group's diagonal block of the input Hessian (plain
    squared error when hessian is None); refine > 0 then also tries the `refine` bf16-exact scales
    on each side of every group's best (its zero point kept). Returns (scale, zero) float [N, K/G]."""
    n, k = w.shape
    ng = k // group_size
    w = w.float()
    blocks = None
    if hessian is not None:
        idx = torch.arange(k).view(ng, group_size)
        blocks = hessian[idx[:, :, None], idx[:, None, :]]  # [ng, G, G]
    best_err = torch.full((n, ng), math.inf)
    best_scale = best_zero = None

    def consider(scale, zero):
        nonlocal best_err, best_scale, best_zero
        _, deq = _quant_dequant(w, scale, zero, group_size)
        d = (w - deq).view(n, ng, group_size)
        err = d.pow(2).sum(-1) if blocks is None else torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = err < best_err
        if best_scale is None:
            best_scale, best_zero = scale.clone(), zero.clone()
        best_scale[better], best_zero[better] = scale[better], zero[better]
        best_err = torch.minimum(best_err, err)

    for ratio in CLIP_RATIOS if ratios is None else ratios:
        consider(*_group_params(w, group_size, symmetric, ratio))
    centre, centre_zero = best_scale.clone(), best_zero.clone()
    for step in (j for i in range(1, refine + 1) for j in (i, -i)):
        consider(_bf16_neighbour(centre, step), centre_zero)
    return best_scale, best_zero


def _to_format(codes, scale, zero, symmetric):
    return (codes.to(torch.uint8), scale.half(), None if symmetric else zero.to(torch.uint8))


def clipped_rtn(w, group_size, symmetric, hessian=None, ratios=None, refine: int = 0):
    scale, zero = clip_search(w, group_size, symmetric, hessian, ratios, refine)
    codes, _ = _quant_dequant(w.float(), scale, zero, group_size)
    return _to_format(codes, scale, zero, symmetric)


# ---------------------------------------------------------------- GPTQ


def gptq(w, hessian, group_size, symmetric, block: int = 128, damp: float = 0.01, ratios=None, refine: int = 0):
    """GPTQ of one linear w [N, K] with input Hessian [K, K] -> (codes, scales, zeros) in our grid.

    Act order with static groups: the group scales are fixed first (clip search on the original
    weights), then columns are quantized in descending Hessian-diagonal order, each one's error
    spread over the columns not yet quantized."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = clip_search(w, group_size, symmetric, hessian.float(), ratios, refine)
    col_group = torch.arange(k) // group_size
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    col_scale, col_zero = scale[:, col_group[perm]], zero[:, col_group[perm]]  # [N, K] in sweep order
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError:  # degenerate Hessian (e.g. too little calibration): RTN is the honest fallback
        codes, _ = _quant_dequant(w[:, torch.argsort(perm)], scale, zero, group_size)
        return _to_format(codes, scale, zero, symmetric)
    codes = torch.zeros(n, k)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, s, z = w1[:, i], col_scale[:, i1 + i], col_zero[:, i1 + i]
            q = torch.round(col / s + z).clamp(0, 15)
            codes[:, i1 + i] = q
            e = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return _to_format(codes, scale, zero, symmetric)


# ---------------------------------------------------------------- AWQ scaling


def _fold_into_norm(norm, s):
    """norm output / s, exactly (the linears after it take the * s)."""
    if norm.kind == "rms_gemma":
        norm.weight.copy_((1.0 + norm.weight.float()) / s - 1.0)
    else:
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)


def _fold_into_linear(linear, s):
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)


def awq_scales(x, weights, group_size, symmetric):
    """x [T, K] inputs shared by `weights` (list of [N_i, K]) -> the best per-channel scale s [K]."""
    w = torch.cat(weights, 0).float()
    ref = x @ w.T
    x_mean = x.abs().mean(0).clamp_min(1e-6)
    best, best_s = math.inf, torch.ones_like(x_mean)
    for i in range(AWQ_GRID):
        s = x_mean.pow(i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        scale, zero = _group_params(w * s, group_size, symmetric, 1.0)
        _, deq = _quant_dequant(w * s, scale, zero, group_size)
        err = (x @ (deq / s).T - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


# ---------------------------------------------------------------- the calibrated pass over the layers


def _layer_groups(layer):
    """(what feeds them, [linear names in the layer]) for each set of linears sharing one input."""
    attn, mlp = layer.self_attn, layer.mlp
    if layer.spec.parallel_residual:
        groups = [(layer.attn_norm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "mlp.gate_proj", "mlp.up_proj"])]
    else:
        groups = [(layer.attn_norm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                  (layer.mlp_norm, ["mlp.gate_proj", "mlp.up_proj"])]
    # v -> o folds only when every o input channel maps to one v channel (no GQA head sharing)
    groups.append((attn.v_proj if attn.v_proj.out_features == attn.o_proj.in_features else None, ["self_attn.o_proj"]))
    groups.append((mlp.up_proj, ["mlp.down_proj"]))
    return groups


class _Stop(Exception):
    """Ends a layer's forward once a capture hook holds the input it was asked for."""


class _Capture:
    """Forward pre-hooks that keep the inputs of some linears (as [T, K] fp32 rows).

    stop=True: the hook ends the forward right after keeping its input (_run_layer then returns
    no output), so capturing the inputs of a layer's early linears skips the rest of the layer."""

    def __init__(self, modules: dict, stop: bool = False):
        self.inputs = {name: [] for name in modules}
        self.stop = stop
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            self.inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            if self.stop:
                raise _Stop
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {name: torch.cat(xs) for name, xs in self.inputs.items()}


def _run_layer(model, layer, hidden, batch: int = 4):
    """Every calibration window through one Block (no cache: plain causal attention)."""
    t = hidden.shape[1]
    q_pos = torch.arange(t)
    out = []
    for i in range(0, hidden.shape[0], batch):
        h = hidden[i : i + batch]
        ropes = {key: model.rope(key, q_pos, h.dtype) for key in model.rope_scaling}
        cos, sin = ropes[model.spec.layer_rope[layer.layer_index]]
        try:
            out.append(layer(h, cos, sin, q_pos, torch.tensor(0), None, None, False)[0])
        except _Stop:
            pass
    return torch.cat(out) if out else None


def _hessian(x):
    return (x.T @ x) * (2.0 / x.shape[0])


def _dequantized_grid(grid, group_size):
    """(codes, scales, zeros | None) of _to_format -> the float weight [N, K] it holds."""
    codes, scale, zero = grid
    n, k = codes.shape
    z = 8.0 if zero is None else zero.float()[..., None]
    return ((codes.float().view(n, k // group_size, group_size) - z) * scale.float()[..., None]).view(n, k)


def _fold(feeder, s):
    if hasattr(feeder, "kind"):  # a Norm
        _fold_into_norm(feeder, s)
    else:
        _fold_into_linear(feeder, s)


def _chosen_grids(layer, groups, inputs, grid_of, awq_of, group_size, chosen, prefix):
    """Per set of linears sharing an input: the grids of four ways (scale-searched RTN, GPTQ, and
    both after AWQ's scales where the input can take a fold), the one with the least summed output
    error d^T H d on the calibration inputs kept (its AWQ fold applied). Returns {name: grid}."""
    grids = {}
    # the sets fed by a linear (o by v, down by up) first: their folds change v / up, which must
    # happen before the sets holding v / up are quantized
    for feeder, group in sorted(groups, key=lambda fg: hasattr(fg[0], "kind")):
        x = inputs[group[0]]
        h = _hessian(x)
        weights = [layer.get_submodule(n).weight.float() for n in group]
        s = awq_of(x, weights) if feeder is not None else None
        best = None
        for way, scaled in (("rtn", False), ("gptq", False), ("awq-rtn", True), ("awq-gptq", True)):
            if scaled and s is None:
                continue
            hw = h / (s[:, None] * s[None, :]) if scaled else h  # the Hessian of x / s
            ws = [w * s[None, :] if scaled else w for w in weights]
            gs = [grid_of(w, hw, way.endswith("gptq")) for w in ws]
            # the output error, the same in the scaled space: (x / s) (W s - Q)^T
            err = 0.0
            for w, gr in zip(ws, gs):
                d = w - _dequantized_grid(gr, group_size)
                err += float(((d @ hw) * d).sum())
            if best is None or err < best[0]:
                best = (err, way, gs, scaled)
        _, way, gs, scaled = best
        if scaled:
            _fold(feeder, s)
        for n, gr in zip(group, gs):
            grids[n] = gr
            chosen[f"{prefix}{n}"] = way
    return grids


def _calibrated(model, scheme, calibration, progress, recipe: Recipe, chosen: dict):
    """Layer by layer: capture inputs, (AWQ) scale, quantize, swap the layer's quantized modules in,
    feed its quantized outputs on (sequential quantization)."""
    g, sym = scheme.group_size, scheme.symmetric
    ratios, refine = {"grid": (GRID_RATIOS, 0), "refine": (REFINE_RATIOS, REFINE_STEPS),
                      "ratios": (CLIP_RATIOS, 0)}[recipe.scale_search]

    def grid_of(weight, h, by_gptq: bool = scheme.method == "gptq"):
        if by_gptq:
            return gptq(weight, h, g, sym, ratios=ratios, refine=refine)
        return clipped_rtn(weight, g, sym, h, ratios, refine)

    def awq_of(x, weights):  # AWQ's scales of one set of linears, searched on a subsample of its input
        return awq_scales(x[torch.randperm(x.shape[0], generator=gen)[:AWQ_TOKENS]], weights, g, sym)

    gptq_awq = scheme.method == "gptq" and recipe.awq_scales

    hidden = model.embed_tokens(calibration)
    if model.spec.embed_scale is not None:
        hidden = hidden * torch.tensor(model.spec.embed_scale, dtype=hidden.dtype)
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(list(enumerate(model.layers)), desc=f"{scheme.method} layers", unit="layer", disable=not progress)
    for index, layer in bar:
        layer.layer_index = index
        groups = _layer_groups(layer)
        if scheme.method == "gptq" and recipe.true_sequential:
            for _, group in groups:  # in the order the layer computes them
                cap = _Capture({group[0]: layer.get_submodule(group[0])}, stop=True)
                _run_layer(model, layer, hidden)
                h = _hessian(cap.take()[group[0]])
                grids = {n: grid_of(layer.get_submodule(n).weight, h) for n in group}
                for n, grid in grids.items():
                    _swap_in(model, f"layers.{index}.{n}", grid, scheme)
                del h, grids
        elif scheme.method == "gptq" and recipe.layer_choice:
            names = [n for _, ns in groups for n in ns]
            cap = _Capture({n: layer.get_submodule(n) for n in names})
            _run_layer(model, layer, hidden)
            grids = _chosen_grids(layer, groups, cap.take(), grid_of, awq_of, g, chosen, f"layers.{index}.")
            for n, grid in grids.items():
                _swap_in(model, f"layers.{index}.{n}", grid, scheme)
            del grids
        else:
            names = [n for _, ns in groups for n in ns]
            cap = _Capture({n: layer.get_submodule(n) for n in names})
            _run_layer(model, layer, hidden)
            inputs = cap.take()
            xs = {}
            for feeder, group in groups:  # AWQ: every fold first, so no fold touches a quantized weight
                x = inputs[group[0]]
                if (scheme.method == "awq" or gptq_awq) and feeder is not None:
                    s = awq_of(x, [layer.get_submodule(n).weight for n in group])
                    _fold(feeder, s)
                    for n in group:
                        layer.get_submodule(n).weight.mul_(s[None, :])
                    x = x / s  # what these linears now see
                xs[group[0]] = x
            del inputs
            grids = {}
            for feeder, group in groups:
                h = _hessian(xs[group[0]])
                for n in group:
                    grids[n] = grid_of(layer.get_submodule(n).weight, h)
            for n, grid in grids.items():  # every fold is done: the layer now computes with its codes
                _swap_in(model, f"layers.{index}.{n}", grid, scheme)
            del xs, grids
        hidden = _run_layer(model, layer, hidden)
        del layer.layer_index
    # the output side: the final normed hidden states are what the lm_head multiplies
    final = model.norm(hidden).reshape(-1, hidden.shape[-1])
    h = _hessian(final)
    table = model.embed_tokens.weight
    table_grid = scheme.table_grid(table)  # a scheme whose table has its own format and grid
    if model.lm_head is not None:  # untied: the lm_head by the method; the table is only looked up
        _swap_in(model, "lm_head", grid_of(model.lm_head.weight, h), scheme)
        _swap_in(model, "embed_tokens", table_grid or clipped_rtn(table, g, sym, h, ratios, refine), scheme)
    elif table_grid is not None:
        _swap_in(model, "embed_tokens", table_grid, scheme)
    elif scheme.method == "gptq" and recipe.embedding == "gptq":
        _swap_in(model, "embed_tokens", gptq(table, h, g, sym, ratios=ratios, refine=refine), scheme)
    else:
        _swap_in(model, "embed_tokens", clipped_rtn(table, g, sym, h, ratios, refine), scheme)


# ---------------------------------------------------------------- the cached reference checkpoint


def quantize_folder(model_name, scheme, out, calibration_source: str = DEFAULT_CALIBRATION,
                    samples: int = CALIBRATION_SAMPLES, progress: bool = True, force: bool = False,
                    allow_pickle: bool = False) -> dict:
    """Loads a float model, quantizes it and writes the checkpoint folder atomically; returns facts."""
    import time

    from .artifact import atomic_folder
    from .loading import load_model
    from .qformat import is_quantized_folder, save_quantized

    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    model, tok, folder = load_model(model_name, allow_pickle=allow_pickle)
    if is_quantized_folder(folder):
        raise EdgeSLMError(f"{folder} is already a quantized checkpoint; quantize the float model")
    scheme.check_shapes(model)  # a group size that does not divide some K, refused before any work
    params = sum(p.numel() for p in model.parameters())
    calibration = None
    if scheme.needs_calibration:
        calibration = calibration_tokens(tok, calibration_source, samples)
    start = time.perf_counter()
    quantize_model(model, scheme, calibration, progress=progress)
    seconds = time.perf_counter() - start
    with atomic_folder(out, force=force) as tmp:
        save_quantized(model, scheme, tmp, tok, extra={
            "source": str(folder),
            "calibration": calibration_source if calibration is not None else None,
            "calibration_tokens": int(calibration.numel()) if calibration is not None else 0,
        })
        weights = (tmp / "model.safetensors").stat().st_size
    return {"model": str(folder), "scheme": scheme.name, "description": scheme.describe(), "out": str(out),
            "weights_bytes": weights, "parameters": params, "bytes_per_param": weights / params,
            "calibration": calibration_source if calibration is not None else None,
            "calibration_tokens": int(calibration.numel()) if calibration is not None else 0,
            "seconds": round(seconds, 1)}


def reference_folder(model_name, scheme, calibration_source: str = DEFAULT_CALIBRATION, progress: bool = True,
                     allow_pickle: bool = False):
    """The folder every target exports from and verify compares against, for (model, scheme).

    A float scheme uses the model folder itself. A quantized scheme is computed once into
    <cache>/quantized/<model>-<digest>-<scheme>/ (quantize once: every target reads these tensors).
    A folder that already is a quantized checkpoint is used as it is.
    """
    import hashlib
    import json

    from .artifact import atomic_folder, content_key
    from .loading import cache_dir, load_model, resolve_model_path
    from .qformat import is_quantized_folder, save_quantized

    folder = resolve_model_path(model_name)
    if is_quantized_folder(folder):
        have = json.loads((folder / "quant.json").read_text())["scheme"]
        if scheme.name != have:
            raise EdgeSLMError(f"{folder} is already quantized as {have}; it cannot be exported as {scheme.name}")
        return folder
    if not scheme.quantized:
        return folder
    # keyed by content: the model's weights and config, the calibration text (a user's file by its
    # bytes), the recipe constants, and the tool versions (content_key adds those)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    calibration_file = Path(calibration_source)
    key = content_key(*weights, calibration_file if calibration_file.is_file() else calibration_source, SCALE_GRID,
                      f"{CALIBRATED_RECIPE}:{RECIPE}:{CALIBRATION_SAMPLES}x{CALIBRATION_LENGTH}" if scheme.needs_calibration
                      else "", scheme.name)
    h = hashlib.sha256(key.encode())
    target = cache_dir() / "quantized" / f"{folder.name}-{h.hexdigest()[:12]}-{scheme.name}"
    if (target / "quant.json").is_file():
        return target
    model, tok, _ = load_model(folder, allow_pickle=allow_pickle)
    calibration = None
    if scheme.needs_calibration:
        calibration = calibration_tokens(tok, calibration_source)
    quantize_model(model, scheme, calibration, progress=progress)
    with atomic_folder(target, force=True) as tmp:
        save_quantized(model, scheme, tmp, tok, extra={"source": str(folder), "calibration": calibration_source})
    return target
