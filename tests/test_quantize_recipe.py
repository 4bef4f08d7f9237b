"""The calibrated quantizer's recipe choices (quantizer.Recipe): each one on the objective it
minimises, on tiny inputs; seeded calibration windows are distinct, repeatable and from the text."""

import copy

import pytest
import torch

from tiny import tiny_pair

from edgeslm.kernels.int4_matmul import dequantize_int4, pack_int4
from edgeslm.quantizer import (CLIP_RATIOS, GRID_RATIOS, REFINE_RATIOS, REFINE_STEPS, Recipe, _bf16_neighbour,
                               _quant_dequant, calibration_tokens, clip_search, gptq, quantize_model)
from edgeslm.schemes import get_scheme


def correlated_inputs(t=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 2 * mix)
    x[:, :4] *= 20
    return x


def group_errors(w, scale, zero, h, group):
    """d^T H_g d per group: the layer-output error each group's rounding costs."""
    n, k = w.shape
    _, deq = _quant_dequant(w, scale, zero, group)
    d = (w - deq).view(n, k // group, group)
    idx = torch.arange(k).view(k // group, group)
    blocks = h[idx[:, :, None], idx[:, None, :]]
    return torch.einsum("ngi,gij,ngj->ng", d, blocks, d)


def test_grid_scale_search_is_no_worse_than_the_ratios_in_every_group():
    """GRID_RATIOS lands on every bf16-exact scale the 13 ratios can give (and more), so its best
    group error is at most theirs, group by group; its scales stay bf16-exact."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 128) * 0.05, correlated_inputs()
    h = x.T @ x / x.shape[0]
    s_ratio, z_ratio = clip_search(w, 32, True, h, CLIP_RATIOS)
    s_grid, z_grid = clip_search(w, 32, True, h, GRID_RATIOS)
    e_ratio, e_grid = group_errors(w, s_ratio, z_ratio, h, 32), group_errors(w, s_grid, z_grid, h, 32)
    assert bool((e_grid <= e_ratio * (1 + 1e-5)).all())
    assert e_grid.sum() < e_ratio.sum()
    half = s_grid.half()
    assert torch.equal(half.to(torch.bfloat16).to(torch.float16), half)


def test_refined_search_improves_on_its_coarse_ratios_and_on_the_13_ratios():
    """The bf16-neighbour refinement only ever lowers a group's error below its coarse best, and
    its scales stay bf16-exact; on correlated inputs it beats the 13 clip ratios in total."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 128) * 0.05, correlated_inputs()
    h = x.T @ x / x.shape[0]
    coarse = group_errors(w, *clip_search(w, 32, True, h, REFINE_RATIOS), h, 32)
    s, z = clip_search(w, 32, True, h, REFINE_RATIOS, REFINE_STEPS)
    refined = group_errors(w, s, z, h, 32)
    assert bool((refined <= coarse * (1 + 1e-5)).all()) and refined.sum() < coarse.sum()
    assert refined.sum() < group_errors(w, *clip_search(w, 32, True, h, CLIP_RATIOS), h, 32).sum()
    half = s.half()
    assert torch.equal(half.to(torch.bfloat16).to(torch.float16), half)


def test_bf16_neighbours_are_the_adjacent_exact_values():
    s = torch.tensor([0.01, 0.3, 1.0]).to(torch.bfloat16).float()
    up, down = _bf16_neighbour(s, 1), _bf16_neighbour(s, -1)
    assert bool((up > s).all()) and bool((down < s).all())
    assert torch.allclose(up / s - 1, torch.tensor([2**-7, 2**-7, 2**-7]), rtol=0.5)
    between = ((s + up) / 2).to(torch.bfloat16).float()  # nothing bf16-exact lies strictly between them
    assert bool((between.eq(s) | between.eq(up)).all())


def test_gptq_with_the_grid_search_still_beats_plain_rounding():
    torch.manual_seed(1)
    w, x = torch.randn(64, 128) * 0.05, correlated_inputs(seed=1)
    h = x.T @ x / x.shape[0]
    codes, scales, zeros = gptq(w, h, 32, True, ratios=GRID_RATIOS)
    wq = dequantize_int4(pack_int4(codes), scales, zeros, 32)
    s, z = clip_search(w, 32, True, None, [1.0])
    _, rtn = _quant_dequant(w, s, z, 32)
    err = lambda v: (x @ (w - v).T).pow(2).mean().item()  # noqa: E731
    assert err(wq) < 0.7 * err(rtn)


def logits_error(model, quantized, ids):
    ref, out = model(ids)[0], quantized(ids)[0]
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("recipe", [Recipe(true_sequential=True), Recipe(embedding="gptq"),
                                    Recipe(scale_search="grid", embedding="gptq", true_sequential=True),
                                    Recipe(scale_search="refine", embedding="gptq", true_sequential=False),
                                    Recipe(awq_scales=True), Recipe(layer_choice=True)])
def test_every_recipe_gives_a_working_model_near_the_default(recipe):
    """Each lever quantizes every module into the same format, and the model stays about as close
    to the float one as with the default recipe (a tiny random model: no lever is judged here)."""
    _, model = tiny_pair("llama")
    calibration = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    scheme = get_scheme("q4g32-gptq")
    default = quantize_model(copy.deepcopy(model), scheme, calibration, progress=False,
                             recipe=Recipe(scale_search="ratios", embedding="clip", true_sequential=False))
    lever = quantize_model(copy.deepcopy(model), scheme, calibration, progress=False, recipe=recipe)
    assert not any(isinstance(m, torch.nn.Linear) for m in lever.modules())
    assert logits_error(model, lever, ids) < 1.5 * logits_error(model, default, ids)


def test_seeded_calibration_windows_are_distinct_and_repeatable(monkeypatch):
    class Chars:  # one token per character: each window can be found again in the text
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return type("Encoding", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})

    import edgeslm.data

    text = "".join(chr(0x100 + i) for i in range(64 * 16))  # every token distinct
    monkeypatch.setattr(edgeslm.data, "load_eval_text", lambda source: text)
    first = calibration_tokens(Chars(), "any", samples=4, length=16)
    a = calibration_tokens(Chars(), "any", samples=4, length=16, seed=1)
    b = calibration_tokens(Chars(), "any", samples=4, length=16, seed=1)
    c = calibration_tokens(Chars(), "any", samples=4, length=16, seed=2)
    windows = torch.tensor([ord(ch) for ch in text]).view(64, 16)
    assert torch.equal(first, windows[:4])
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = [(windows == r).all(-1).nonzero().item() for r in a]  # each a whole window of the text
    assert len(set(rows)) == 4 and rows == sorted(rows)


def test_layer_choice_names_one_way_per_linear_and_applies_its_folds():
    """With layer_choice every linear is named with the grid its set took (sets sharing an input
    take one way together), and the quantized model computes the float one's function closely
    (the AWQ folds it chose are exact)."""
    _, model = tiny_pair("llama")
    calibration = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    chosen = {}
    q = quantize_model(copy.deepcopy(model), get_scheme("q4g32-gptq"), calibration, progress=False,
                       recipe=Recipe(layer_choice=True), chosen=chosen)
    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(chosen) == sorted(names)
    assert set(chosen.values()) <= {"rtn", "gptq", "awq-rtn", "awq-gptq"}
    for i in range(len(model.layers)):
        assert chosen[f"layers.{i}.self_attn.q_proj"] == chosen[f"layers.{i}.self_attn.v_proj"]
        assert chosen[f"layers.{i}.mlp.gate_proj"] == chosen[f"layers.{i}.mlp.up_proj"]
    default = quantize_model(copy.deepcopy(model), get_scheme("q4g32-gptq"), calibration, progress=False)
    assert logits_error(model, q, ids) < 1.5 * logits_error(model, default, ids)
