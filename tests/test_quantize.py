"""Quantization: GPTQ / AWQ against round-to-nearest on the objective each one minimises, the AWQ
folds are exact, the checkpoint round-trips, and the CLI (quantize, eval on the result, bad input)."""

import copy
import json
import string
import subprocess
import sys

import pytest
import torch

from tiny import tiny_pair

from edgeslm.errors import EdgeSLMError
from edgeslm.model import Norm
from edgeslm.loading import load_quantized
from edgeslm.qformat import save_quantized
from edgeslm.schemes.int4 import int4_grid_rtn
from edgeslm.kernels.int4_matmul import dequantize_int4, pack_int4
from edgeslm.quantizer import _fold_into_norm, awq_scales, clipped_rtn, gptq, quantize_model
from edgeslm.schemes import get_scheme

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]


def correlated_inputs(t=2048, k=128, seed=0):
    """Activations with correlated channels and a few outlier channels, like a real residual stream."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 2 * mix)
    x[:, :4] *= 20
    return x


def dequant(grid, group):
    codes, scales, zeros = grid
    return dequantize_int4(pack_int4(codes), scales, zeros, group)


def output_error(x, w, wq):
    return ((x @ w.T - x @ wq.T).pow(2).mean() / (x @ w.T).pow(2).mean()).item()


@pytest.mark.parametrize("method", ["rtn", "clip", "gptq"])
def test_scales_are_exact_in_bf16(method):
    """XNNPACK keeps blockwise scales as bf16: ours must survive fp16 -> bf16 -> fp16 unchanged."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, correlated_inputs()
    h = x.T @ x / x.shape[0]
    grid = {"rtn": lambda: int4_grid_rtn(w, 32, True), "clip": lambda: clipped_rtn(w, 32, True, h),
            "gptq": lambda: gptq(w, h, 32, True)}[method]()
    scales = grid[1]
    assert scales.dtype == torch.float16
    assert torch.equal(scales.to(torch.bfloat16).to(torch.float16), scales)
    plain = torch.randn(256).half()  # the check is not vacuous: plain fp16 values do not survive it
    assert not torch.equal(plain.to(torch.bfloat16).to(torch.float16), plain)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_layer_output(symmetric):
    torch.manual_seed(0)
    x, w = correlated_inputs(), torch.randn(96, 128) * 0.05
    h = (x.T @ x) * (2 / x.shape[0])
    rtn = dequant(int4_grid_rtn(w, 32, symmetric), 32)
    grid = gptq(w, h, 32, symmetric)
    codes, scales, zeros = grid
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.dtype == torch.float16
    assert scales.shape == (96, 4) and (zeros is None) == symmetric
    e_rtn, e_gptq = output_error(x, w, rtn), output_error(x, w, dequant(grid, 32))
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)


def test_awq_scales_and_clip_beat_rtn():
    torch.manual_seed(0)
    x, w = correlated_inputs(seed=1), torch.randn(64, 128) * 0.05
    s = awq_scales(x, [w], 32, True)
    assert s.shape == (128,) and (s > 0).all()
    h = ((x / s).T @ (x / s)) * (2 / x.shape[0])
    scaled = dequant(clipped_rtn(w * s, 32, True, h), 32) / s
    e_rtn, e_awq = output_error(x, w, dequant(int4_grid_rtn(w, 32, True), 32)), output_error(x, w, scaled)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


@pytest.mark.parametrize("kind", ["rms", "rms_gemma", "layer"])
def test_awq_fold_into_norm_is_exact(kind):
    torch.manual_seed(0)
    norm = Norm(kind, 32, 1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(32) * 0.3)
        if norm.bias is not None:
            norm.bias.add_(torch.randn(32) * 0.3)
    x, w, s = torch.randn(5, 32), torch.randn(16, 32), torch.rand(32) * 3 + 0.1
    ref = norm(x) @ w.T
    with torch.no_grad():
        _fold_into_norm(norm, s)
    torch.testing.assert_close(norm(x) @ (w * s).T, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,scheme", [("llama", "q4g32-gptq"), ("gemma2", "q4g32-awq"), ("stablelm", "q4g32a-awq"),
                                           ("qwen2", "q8c")])
def test_quantized_checkpoint_round_trip(tmp_path, family, scheme):
    """Every method lands in the one format: save, load back, same logits; error well under RTN's scale."""
    _, model = tiny_pair(family)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = model(ids)[0]
    q = quantize_model(copy.deepcopy(model), get_scheme(scheme), torch.randint(0, 97, (4, 32)), progress=False)
    out = q(ids)[0]
    save_quantized(q, get_scheme(scheme), tmp_path)
    loaded, sch = load_quantized(tmp_path)
    assert sch.name == scheme
    torch.testing.assert_close(loaded(ids)[0], out, rtol=0, atol=1e-5)
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert rel < (0.1 if scheme == "q8c" else 0.9), rel


def test_group_size_must_divide_k():
    _, model = tiny_pair("llama")  # hidden 64: g128 cannot group it
    with pytest.raises(EdgeSLMError, match="group size 128 does not divide"):
        quantize_model(model, get_scheme("q4g128-gptq"), torch.zeros(1, 8, dtype=torch.long), progress=False)


# ---------------------------------------------------------------- the CLI on a tiny folder


def _run(*args):
    return subprocess.run(EDGESLM + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def _one_line_error(done, needle):
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr and needle in lines[0], done.stderr


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf, _ = tiny_pair("llama")
    folder = tmp_path_factory.mktemp("tinyq")
    hf.save_pretrained(str(folder), safe_serialization=True)
    chars = ["[UNK]", "\n"] + [c for c in string.printable if 32 <= ord(c) < 127]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(folder))
    text = folder / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; it was a sunny day.\n" * 40)
    return folder


def test_cli_quantize_then_eval_says_scheme(tiny_folder, tmp_path):
    out = tmp_path / "q"
    done = _run("quantize", tiny_folder, "--scheme", "q4g32-gptq", "--out", out, "--calibration",
                tiny_folder / "calib.txt", "--samples", "4", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["scheme"] == "q4g32-gptq" and facts["calibration_tokens"] == 4 * 512
    meta = json.loads((out / "quant.json").read_text())
    assert meta["method"] == "gptq" and meta["symmetric"] and "embed_tokens" in meta["quantized"]
    done = _run("eval", out, "--data", tiny_folder / "calib.txt", "--tokens", "256", "--context", "64", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["scheme"] == "q4g32-gptq" and 1 < result["perplexity"] < 1000


def test_cli_bad_scheme_and_group(tiny_folder, tmp_path):
    _one_line_error(_run("quantize", tiny_folder, "--scheme", "q3g32-gptq", "--out", tmp_path / "a"), "unknown scheme")
    done = _run("quantize", tiny_folder, "--scheme", "q4g128-rtn", "--out", tmp_path / "b")
    _one_line_error(done, "group size 128 does not divide")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
