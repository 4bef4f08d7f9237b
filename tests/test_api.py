"""The Python API on a tiny model: keyword-only calls, typed results with to_json(), one verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import edgeslm
from tiny_export import isolated_cache, tiny_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("api")
    isolated_cache(tmp, mp)
    yield tmp, tiny_model_folder(tmp / "tiny", "qwen2")
    mp.undo()


def test_export_verify_check(tiny):
    tmp, folder = tiny
    art = edgeslm.export(folder, target="onnx", scheme="q4g32-rtn", out=tmp / "art", context=256, progress=False)
    assert isinstance(art, edgeslm.results.Artifact) and art.target == "onnx" and art.passed is True
    assert art.manifest["accuracy_level"] == 4  # the default: int8 activations, bounds derived from them
    report = edgeslm.verify(art, progress=False)
    assert report.passed is True and report.failures == []
    assert json.loads(report.to_json())["passed"] is True
    checked = edgeslm.check(art, devices=["pixel-8"], runs=1, warmup=0, decode_tokens=4, progress=False)
    assert checked.passed is False and checked.verdicts["unverified"] > 0  # an estimate never passes alone
    assert edgeslm.check(art, devices=["pixel-8"], allow_estimates=True, progress=False).passed is True
    with pytest.raises(TypeError):
        edgeslm.export(folder, "onnx", "f32", tmp / "x")  # keyword-only beyond the model


def test_quantize_and_load(tiny):
    tmp, folder = tiny
    ckpt = edgeslm.quantize(folder, scheme="q4g32-rtn", out=tmp / "q", progress=False)
    assert ckpt.scheme == "q4g32-rtn" and (tmp / "q" / "quant.json").is_file()
    decoder, tokenizer = edgeslm.load(tmp / "q")
    assert decoder.spec.family == "qwen2" and tokenizer is not None
    with pytest.raises(edgeslm.EdgeSLMError):
        edgeslm.load(tmp / "nothing-here")


def test_import_and_help_stay_light():
    """`import edgeslm` and `edgeslm --help` import no torch: the API loads on first use."""
    code = ("import sys, edgeslm, edgeslm.cli.main as m; m.build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
