"""q8g32, the scheme added as one file (edgeslm/schemes/int8_groups.py): its grid, its checkpoint
round trip, and its export to each target that carries it, verified in that target's runtime."""

from __future__ import annotations

import pytest
import torch

import edgeslm
from edgeslm.schemes import get_scheme
from edgeslm.targets.registry import get_target
from tiny import tiny_pair
from tiny_export import assert_exports_and_verifies, isolated_cache, tiny_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("q8g32")
    isolated_cache(tmp, mp)
    yield tmp, tiny_model_folder(tmp / "tiny", "qwen2")
    mp.undo()


def test_groups_beat_channels_on_the_same_weights():
    """One scale per 32 weights fits a row with an outlier better than one scale per row."""
    w = torch.randn(64, 128)
    w[:, 5] *= 30  # an outlier column, as real activations' weights have
    errors = {}
    for name in ("q8g32", "q8c"):
        scheme = get_scheme(name)
        module = scheme.linear_module(128, 64, bias=False)
        scheme.fill(module, scheme.rtn_grid(w))
        errors[name] = float((module.dequantized() - w).pow(2).mean())
    assert errors["q8g32"] < 0.5 * errors["q8c"]


def test_checkpoint_round_trip(tiny):
    tmp, folder = tiny
    edgeslm.quantize(folder, scheme="q8g32", out=tmp / "q", progress=False)
    decoder, _ = edgeslm.load(tmp / "q")
    _, float_model = tiny_pair("qwen2")
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        reference = float_model(ids)[0]
        diff = (decoder(ids)[0] - reference).abs().max()
    assert 0 < float(diff) < 0.1 * float(reference.abs().max())  # quantized, and close to the float model


@pytest.mark.parametrize("target", ["onnx", "coreml"])
def test_exports_and_verifies(tiny, target):
    tmp, folder = tiny
    assert_exports_and_verifies(folder, tmp / target, target, "q8g32")


@pytest.mark.parametrize("target", ["executorch", "webgpu"])
def test_targets_without_a_lowering_refuse_it(target):
    _, model = tiny_pair("qwen2")
    reason = get_target(target).unsupported_reason(model, get_scheme("q8g32"))
    assert reason and "q8g32" in reason


def test_scheme_table_names_what_each_file_defines():
    import importlib

    from edgeslm.schemes import SCHEME_MODULES, all_schemes

    for module, spelled in SCHEME_MODULES.items():
        names = [s.name for s in importlib.import_module(f"edgeslm.schemes.{module}").schemes()]
        if "{" not in spelled:
            assert names == [n.strip() for n in spelled.split(",")], module
        assert all(all_schemes()[n].name == n for n in names)
    assert len(all_schemes()) == 23
