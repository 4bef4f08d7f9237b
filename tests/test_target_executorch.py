"""ExecuTorch target on tiny Gemma 2 (window 8, softcaps): a 3-method XNNPACK .pte run by
executorch.runtime; fp32 parity, and int4 as 8-bit dynamic activations x our int4 codes."""

from __future__ import annotations

import pytest
import torch

from tiny_export import isolated_cache, tiny_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("et")
    isolated_cache(tmp, mp)
    yield tmp, tiny_model_folder(tmp / "tiny-gemma2", "gemma2")
    mp.undo()


def test_torchao_weight_is_our_int4():
    from edgeslm.qformat import Int4Linear, fill_int4, int4_grid_rtn
    from edgeslm.targets.executorch import torchao_int4_weight

    torch.manual_seed(0)
    m = Int4Linear(64, 48, 32, True, bias=False)
    fill_int4(m, *int4_grid_rtn(torch.randn(48, 64), 32, True))
    w = torchao_int4_weight(m, torch.arange(2))
    assert torch.equal(w.dequantize(), m.dequantized())
    assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7
    second = torchao_int4_weight(m, torch.tensor([1]))  # one input group: columns 32..63
    assert torch.equal(second.dequantize(), m.dequantized()[:, 32:])


def test_range_bins_split_large_inputs_from_small():
    """Input groups within RANGE_RATIO (2x) share an int8 range; at most MAX_BINS (6) bins."""
    from edgeslm.targets.executorch import range_bins

    bins = range_bins(torch.tensor([100.0, 90.0, 10.0, 1.0, 0.01, 50.0]))
    assert [b.tolist() for b in bins] == [[0, 1], [5], [2], [3, 4]]  # 1/100 and 1/10^4 share the last bin
    assert [b.tolist() for b in range_bins(torch.tensor([3.0, 2.0]))] == [[0, 1]]


def test_sliced_linear_sums_its_slices():
    """A linear split by input-group bins computes the unsplit function (checked without the
    dynamic activation quantization, which is what the split changes)."""
    from edgeslm.qformat import Int4Linear, fill_int4, int4_grid_rtn
    from edgeslm.targets.executorch import EtInt4Linear

    torch.manual_seed(0)
    m = Int4Linear(96, 16, 32, True, bias=True)
    fill_int4(m, *int4_grid_rtn(torch.randn(16, 96), 32, True))
    m.bias.data.normal_()
    sliced = EtInt4Linear(m, [torch.tensor([0, 2]), torch.tensor([1])])
    x = torch.randn(3, 96)
    y = sum(x.index_select(-1, getattr(sliced, f"channels_{i}")) @ getattr(sliced, f"weight_{i}").dequantize().T
            for i in range(sliced.num_bins)) + m.bias
    torch.testing.assert_close(y, x @ m.dequantized().T + m.bias, rtol=1e-5, atol=1e-5)


def test_remainder_of_negative_ring_positions():
    """ExecuTorch's portable remainder truncates negative int64; the decoder keeps dividends >= 0."""
    from edgeslm.model import ring_positions

    assert ring_positions(torch.tensor(0), 8).tolist() == [-1] * 8
    assert ring_positions(torch.tensor(3), 8).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    assert ring_positions(torch.tensor(10), 8).tolist() == [8, 9, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("scheme", ["f32", "q4g32-rtn"])
def test_executorch_parity(tiny, scheme):
    from edgeslm.export import export_artifact

    tmp, folder = tiny
    out = tmp / f"et-{scheme}"
    manifest = export_artifact(folder, "executorch", scheme, out, context=128, prefill_chunk=16, progress=False)
    parity = manifest["parity"]
    assert manifest["files"]["model.pte"]["bytes"] > 0
    assert manifest["lowering"]["decode"]["delegate_calls"] >= 1  # XNNPACK took the matmuls
    assert parity["passed"], parity["failures"]
    assert parity["steps"] >= 3 * 8 and parity["greedy_disagree"] == 0
    if scheme == "f32":
        assert parity["max_abs_logit_diff"] < 1e-3
    assert abs(parity["ppl_rel_diff"]) < 0.01
