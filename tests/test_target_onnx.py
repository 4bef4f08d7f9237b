"""ONNX target on tiny Gemma 2 (window 8, softcaps): int4 as MatMulNBits over our packed tensors."""

from __future__ import annotations

import pytest
import torch

from tiny_export import isolated_cache, tiny_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("onnx")
    isolated_cache(tmp, mp)
    yield tmp, tiny_model_folder(tmp / "tiny-gemma2", "gemma2")
    mp.undo()


@pytest.mark.parametrize("scheme", ["q4g32-rtn", "q4g32a-rtn"])
def test_int4_matmulnbits_parity(tiny, scheme):
    import onnx
    from onnx import numpy_helper

    from edgeslm.export import export_artifact
    from edgeslm.loading import load_model

    tmp, folder = tiny
    out = tmp / f"onnx-{scheme}"
    manifest = export_artifact(folder, "onnx", scheme, out, context=128, prefill_chunk=16, progress=False)
    parity = manifest["parity"]
    assert parity["passed"], parity["failures"]
    assert abs(parity["ppl_rel_diff"]) < 0.01  # the bound
    assert parity["max_abs_logit_diff"] < 1e-4  # MatMulNBits dequantizes our codes exactly; fp32 accumulation
    assert parity["greedy_disagree"] == 0

    ref, _, _ = load_model(manifest["reference"], with_tokenizer=False)
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    mm = [n for n in graph.node if n.op_type == "MatMulNBits"]
    linears = 7 * ref.spec.num_layers
    assert len(mm) == linears + 1  # every projection + the tied lm_head
    # the lm_head's B is the embedding's packed table, the one the Gather reads: stored once
    gathers = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    assert mm[-1].input[1] in gathers
    # B holds our qweight bytes, untouched
    onnx_full = onnx.load(str(out / "decode.onnx"))
    inits = {i.name: i for i in onnx_full.graph.initializer}
    b = numpy_helper.to_array(inits[mm[-1].input[1]]).copy()
    assert torch.equal(torch.from_numpy(b.reshape(b.shape[0], -1)), ref.embed_tokens.qweight)
    scales = [inits[i] for i in inits if i.endswith("scales")]
    assert scales and all(i.data_type == onnx.TensorProto.FLOAT16 for i in scales)  # fp16 on disk, as ours
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.dims and i.dims[0] * (i.dims[1] if len(i.dims) > 1 else 1)
                   >= 64 * 64 for i in onnx_full.graph.initializer)  # no float copy of any weight matrix


def test_runner_measure_speed(tiny):
    from edgeslm.artifact import read_manifest
    from edgeslm.export import export_artifact
    from edgeslm.targets.registry import get_target

    tmp, folder = tiny
    out = tmp / "onnx-speed"
    export_artifact(folder, "onnx", "q4g32-rtn", out, context=128, prefill_chunk=16, verify=False, progress=False)
    manifest = read_manifest(out)
    assert manifest["parity"] is None
    runner = get_target("onnx").load(out, manifest)
    speed = runner.measure_speed(prompt_len=40, decode_steps=8, repeats=1, vocab=97)
    assert speed["ttft_s"] > 0 and speed["decode_tok_s"] > 0 and speed["prompt_tokens"] == 40
