"""q4g32e8-gptq, the scheme added as one file (edgeslm/schemes/int4_int8_table.py): q4g32-gptq's
linears with an int8 group-32 table, its checkpoint round trip, and its export to each target that
carries it, verified in that target's runtime."""

from __future__ import annotations

import copy

import pytest
import torch

import edgeslm
from edgeslm.quantizer import quantize_model
from edgeslm.schemes import get_scheme
from edgeslm.schemes.int4 import Int4Linear
from edgeslm.schemes.int8_groups import Int8GroupEmbedding, int8_group_grid_rtn
from edgeslm.targets.registry import get_target
from tiny import tiny_pair
from tiny_export import assert_exports_and_verifies, isolated_cache, tiny_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("q4g32e8")
    isolated_cache(tmp, mp)
    yield tmp, tiny_model_folder(tmp / "tiny", "qwen2")
    mp.undo()


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # a tied table, an untied lm_head
def test_linears_are_q4g32_gptqs_and_the_table_is_int8_rtn(family):
    """The calibrated pass reads the float table, so every linear gets q4g32-gptq's codes exactly;
    the table holds the int8 group-32 round-to-nearest grid; an untied lm_head is an int4 linear."""
    _, model = tiny_pair(family)
    calibration = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    table = model.embed_tokens.weight.detach().clone()
    mixed = quantize_model(copy.deepcopy(model), get_scheme("q4g32e8-gptq"), calibration, progress=False)
    int4 = quantize_model(copy.deepcopy(model), get_scheme("q4g32-gptq"), calibration, progress=False)
    assert isinstance(mixed.embed_tokens, Int8GroupEmbedding)
    codes, scales = int8_group_grid_rtn(table)
    assert torch.equal(mixed.embed_tokens.qweight, codes) and torch.equal(mixed.embed_tokens.scales, scales)
    linears = [n for n, m in int4.named_modules() if isinstance(m, Int4Linear) and n != "embed_tokens"]
    assert linears and (family == "qwen2") == ("lm_head" not in linears)
    for name in linears:
        a, b = mixed.get_submodule(name), int4.get_submodule(name)
        assert type(a) is Int4Linear and torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), name


def test_checkpoint_round_trip(tiny):
    """The saved checkpoint loads back with its int8 table; with q4g32-gptq's linears and a finer
    table it is at least about as close to the float model as q4g32-gptq's checkpoint."""
    tmp, folder = tiny
    _, float_model = tiny_pair("qwen2")
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    diffs = {}
    for scheme in ("q4g32e8-gptq", "q4g32-gptq"):
        edgeslm.quantize(folder, scheme=scheme, out=tmp / scheme, progress=False)
        decoder, _ = edgeslm.load(tmp / scheme)
        with torch.no_grad():
            diffs[scheme] = float((decoder(ids)[0] - float_model(ids)[0]).abs().max())
    assert isinstance(edgeslm.load(tmp / "q4g32e8-gptq")[0].embed_tokens, Int8GroupEmbedding)
    assert 0 < diffs["q4g32e8-gptq"] < 1.25 * diffs["q4g32-gptq"], diffs


@pytest.mark.parametrize("target", ["onnx", "coreml"])
def test_exports_and_verifies(tiny, target):
    tmp, folder = tiny
    assert_exports_and_verifies(folder, tmp / target, target, "q4g32e8-gptq")


def test_gguf_is_q4_0_with_a_q8_0_table_and_verifies_in_llama_cpp(tmp_path, monkeypatch):
    """llama.cpp's default Q4_0 layout: Q4_0 linears, a Q8_0 token_embd (also the output), run by
    llama.cpp within the bound export derived (a byte-level BPE tokenizer, which GGUF needs)."""
    from test_target_gguf import HAVE_LLAMA_CPP, byte_level_folder

    if not HAVE_LLAMA_CPP:
        pytest.skip("llama.cpp not installed (bash scripts/setup.sh)")
    isolated_cache(tmp_path, monkeypatch)
    folder = byte_level_folder(tmp_path / "tiny", "qwen2")
    art = assert_exports_and_verifies(folder, tmp_path / "gguf", "gguf", "q4g32e8-gptq")
    types = art.manifest["ggml_types"]
    assert types.get("Q8_0") == 1 and types.get("Q4_0", 0) > 0, types


@pytest.mark.parametrize("target", ["executorch", "webgpu"])
def test_targets_without_a_lowering_refuse_it(target):
    _, model = tiny_pair("qwen2")
    reason = get_target(target).unsupported_reason(model, get_scheme("q4g32e8-gptq"))
    assert reason and "q4g32e8-gptq" in reason
