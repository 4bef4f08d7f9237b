"""The GGUF target: exact re-packing of our int4/int8 tensors, and parity in llama.cpp itself.

What runs where:
  - everywhere (CI included): the GGUF is read back by the gguf package's own dequantizer and by
    transformers' GGUF loader; both must give OUR dequantized weights bit for bit, and transformers'
    model on those weights must reproduce the reference decoder's logits. Refusals are checked.
  - where llama.cpp is installed (scripts/setup.sh compiles it; without it these tests skip and say
    why): llama.cpp runs the exported GGUF, and its logits and greedy tokens are compared with the
    PyTorch reference, on tiny models of each supported family (past their sliding windows) and on
    SmolLM2-135M (Q4_0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeslm.errors import EdgeSLMError
from edgeslm.schemes.base import QuantizedLinear
from edgeslm.quantizer import quantize_model
from edgeslm.schemes import get_scheme
from edgeslm.targets.base import ExportContext
from edgeslm.targets.gguf import TARGET, llama_cpp_python, rope_interleave_rows
from tiny import tiny_pair

HAVE_LLAMA_CPP = llama_cpp_python() is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama.cpp not installed (bash scripts/setup.sh)")
NEW_FAMILIES = ["gemma2", "gemma3", "phi3", "stablelm"]
# llama.cpp derives Gemma's query scale from the head size (as Gemma's released models set it), so
# the tiny Gemmas here use query_pre_attn_scalar = head_dim; tiny.py's 24 is refused (test_refusals)
LLAMA_CPP_SHAPES = {"gemma2": dict(query_pre_attn_scalar=16), "gemma3": dict(query_pre_attn_scalar=16)}


def tiny_export(tmp_path, family, scheme_name, seed=0):
    _, model = tiny_pair(family, seed=seed, hidden_size=64, intermediate_size=128, **LLAMA_CPP_SHAPES.get(family, {}))
    scheme = get_scheme(scheme_name)
    quantize_model(model, scheme)
    assert TARGET.unsupported_reason(model, scheme) is None
    fields = TARGET.export(model, scheme, tmp_path, ExportContext(model_name="tiny", reference="", context_length=128))
    return model, scheme, fields


def assert_export_refused(folder, tmp_path, message: str):
    """`edgeslm export --target gguf` of folder exits 2 with one stderr line holding message, and
    writes neither the artifact nor a temporary sibling."""
    out = tmp_path / "gguf"
    env = {**os.environ, "EDGESLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "edgeslm.cli.main", "export", str(folder), "--target", "gguf",
                           "--out", str(out), "--no-verify"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(out.name)]  # no temporary sibling either

def reference_weights(model) -> dict[str, torch.Tensor]:
    """Our dequantized (or float) weights under GGUF names, with llama's q/k rows interleaved."""
    spec = model.spec
    out = {"token_embd.weight": _weight(model.embed_tokens), "output_norm.weight": model.norm.weight.detach()}
    if model.lm_head is not None:
        out["output.weight"] = _weight(model.lm_head)
    q_rows = rope_interleave_rows(spec.num_heads)(spec.num_heads * spec.head_dim)
    k_rows = rope_interleave_rows(spec.num_kv_heads)(spec.num_kv_heads * spec.head_dim)
    llama = spec.family == "llama"
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        out[f"blk.{i}.attn_q.weight"] = _weight(a.q_proj)[q_rows] if llama else _weight(a.q_proj)
        out[f"blk.{i}.attn_k.weight"] = _weight(a.k_proj)[k_rows] if llama else _weight(a.k_proj)
        out[f"blk.{i}.attn_v.weight"] = _weight(a.v_proj)
        out[f"blk.{i}.ffn_down.weight"] = _weight(layer.mlp.down_proj)
        out[f"blk.{i}.ffn_norm.weight"] = layer.mlp_norm.weight.detach()
        if spec.qkv_bias:
            out[f"blk.{i}.attn_q.bias"] = a.q_proj.bias.detach()[q_rows] if llama else a.q_proj.bias.detach()
    return out


def _weight(m):
    if isinstance(m, QuantizedLinear):
        return m.dequantized()
    return m.weight.detach()


@pytest.mark.parametrize("family,scheme_name,qtype", [
    ("llama", "q4g32-rtn", "Q4_0"), ("qwen2", "q4g64-rtn", "Q4_0"), ("llama3", "q8c", "Q8_0"), ("llama", "f32", "F32"),
    ("qwen2", "q8g32", "Q8_0"),
])
def test_gguf_holds_our_weights_exactly(tmp_path, family, scheme_name, qtype):
    import gguf

    model, _, fields = tiny_export(tmp_path, family, scheme_name)
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    want = reference_weights(model)
    for name, w in want.items():
        t = tensors[name]
        if w.dim() == 2:
            assert t.tensor_type.name == qtype, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.array_equal(got.astype(np.float32), w.float().numpy()), name
    assert fields["ggml_types"][qtype] >= 7 * 4  # every projection of every layer
    assert reader.fields["general.architecture"].contents() == ("qwen2" if family == "qwen2" else "llama")


@pytest.mark.parametrize("family,scheme_name", [("llama", "q4g32-rtn"), ("qwen2", "f32")])
def test_transformers_reads_it_back_as_the_reference(tmp_path, family, scheme_name):
    """transformers' GGUF loader (which undoes llama's q/k interleave) gives back our function."""
    from transformers import AutoModelForCausalLM

    model, _, _ = tiny_export(tmp_path, family, scheme_name)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (back(ids).logits - model(ids)[0]).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family,overrides,feature", [
    ("gemma2", {}, "query_pre_attn_scalar 24"),  # tiny.py's scalar is not the head size
    ("gemma2", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": None}, "no attn logit soft-cap"),
    ("gemma2", {"query_pre_attn_scalar": 16, "tie_word_embeddings": False}, "separate lm_head"),
    ("gemma3", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.5}, "a attn logit soft-cap"),
    ("llama", {"sliding_window": 8}, "a 8-token sliding window (llama.cpp's llama arch attends over the whole"),
    ("phi3", {"sliding_window": 8}, "a 8-token sliding window (llama.cpp's phi3 arch attends over the whole"),
])
def test_refusals(tmp_path, family, overrides, feature):
    """What llama.cpp's arch cannot compute exactly is refused, naming the family and the feature."""
    _, model = tiny_pair(family, **overrides)
    reason = TARGET.unsupported_reason(model, get_scheme("f32"))
    assert reason and reason.startswith(f"{family}: ") and feature in reason, reason
    with pytest.raises(EdgeSLMError, match=re.escape(feature)):
        TARGET.export(model, get_scheme("f32"), tmp_path, ExportContext(model_name="t", reference=""))
    assert not (tmp_path / "model.gguf").exists()


def test_refuses_asymmetric_int4():
    _, llama = tiny_pair("llama", hidden_size=64, intermediate_size=128)
    reason = TARGET.unsupported_reason(llama, get_scheme("q4g32a-rtn"))
    assert "asymmetric" in reason and "q4g32" in reason


def test_phi3_window_that_never_masks(tmp_path):
    """llama.cpp's phi3 arch attends over the whole context, which is exact for a window no shorter
    than the model's positions (a window that never masks); within the context it must not bite."""
    _, model = tiny_pair("phi3", sliding_window=512)  # max_position_embeddings 512
    assert model.spec.has_local_layers and TARGET.unsupported_reason(model, get_scheme("f32")) is None
    TARGET.export(model, get_scheme("f32"), tmp_path, ExportContext(model_name="t", reference="", context_length=128))
    assert (tmp_path / "model.gguf").is_file()


def test_cli_refuses_a_family_feature_with_one_line(tmp_path):
    from tiny_export import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny", "gemma2")
    assert_export_refused(folder, tmp_path, "gemma2: query_pre_attn_scalar")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_tensors_and_metadata(tmp_path, family):
    """Every tensor is one llama.cpp's arch lists, holding our weights in llama.cpp's convention
    (Gemma's norms as 1 + w, Phi-3's gate and up in one ffn_up), with the arch's metadata."""
    import gguf

    model, _, fields = tiny_export(tmp_path, family, "q4g32-rtn")
    spec, arch = model.spec, fields["gguf_arch"]
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch_enum] for i in range(spec.num_layers)}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= known

    def got(name, shape):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))

    def field(key):
        return reader.fields[key.format(arch=arch)].contents()

    layer = model.layers[1]
    shift = 1.0 if family.startswith("gemma") else 0.0
    assert torch.equal(got("blk.1.attn_norm.weight", (spec.hidden_size,)), layer.attn_norm.weight.detach() + shift)
    up = _weight(layer.mlp.up_proj)
    if family == "phi3":
        both = torch.cat((_weight(layer.mlp.gate_proj), up))
        assert torch.equal(got("blk.1.ffn_up.weight", both.shape), both) and "blk.1.ffn_gate.weight" not in tensors
    else:
        assert torch.equal(got("blk.1.ffn_up.weight", up.shape), up)
    if family == "gemma3":
        assert torch.equal(got("blk.1.attn_q_norm.weight", (spec.head_dim,)), layer.self_attn.q_norm.weight.detach() + 1)
        assert field(gguf.Keys.Rope.FREQ_BASE_SWA) == 10000.0 and field(gguf.Keys.Rope.FREQ_BASE) == 1e6
    if family.startswith("gemma"):
        assert field(gguf.Keys.Attention.SLIDING_WINDOW) == spec.sliding_window
        assert field(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN) == list(spec.layer_is_local)
        assert "output.weight" not in tensors  # tied: llama.cpp multiplies by token_embd
    if family == "gemma2":
        assert field(gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING) == pytest.approx(0.5)
        assert field(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING) == pytest.approx(0.2)
    if family == "stablelm":
        assert torch.equal(got("blk.1.attn_norm.bias", (spec.hidden_size,)), layer.attn_norm.bias.detach())
        assert field(gguf.Keys.Attention.LAYERNORM_EPS) == pytest.approx(spec.norm_eps)
        assert field(gguf.Keys.Rope.DIMENSION_COUNT) == spec.rotary_dim < spec.head_dim
        assert "blk.1.attn_q.bias" in tensors and "output.weight" in tensors  # llama.cpp requires output


def test_transformers_reads_stablelm_back(tmp_path):
    """transformers' GGUF loader reads the stablelm arch (LayerNorm biases, partial rotary) back as ours."""
    from transformers import AutoModelForCausalLM

    model, _, _ = tiny_export(tmp_path, "stablelm", "f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, model.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)[0]).abs().max().item() < 1e-4


def run_llama_cpp(tmp_path, model, scheme, steps=24):
    from edgeslm.model import generate_greedy

    runner = TARGET.load(tmp_path, {"context_length": 128, "scheme": scheme.name})
    try:
        prompt = (torch.arange(1, 17) * 31 % model.spec.vocab_size).view(1, -1)
        ref_tokens, ref_logits = generate_greedy(model, prompt, steps, max_len=128)
        tokens, logits = runner.generate_greedy(prompt, steps)
        full = runner.score(torch.cat((prompt, ref_tokens), 1))[0, prompt.shape[1] - 1 : -1]
    finally:
        runner.close()
    return ref_tokens[0], ref_logits[0], tokens, logits, full


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2"])
def test_llama_cpp_f32_matches_reference(tmp_path, family):
    model, scheme, _ = tiny_export(tmp_path, family, "f32")
    ref_tokens, ref_logits, tokens, logits, full = run_llama_cpp(tmp_path, model, scheme)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-3
    assert (full - ref_logits).abs().max() < 1e-3  # one prefill of prompt + tokens: the same logits


@needs_llama_cpp
@pytest.mark.parametrize("family,scheme_name", [("llama", "q4g32-rtn"), ("qwen2", "q4g32-rtn"), ("llama3", "q8c")])
def test_llama_cpp_quantized_matches_reference(tmp_path, family, scheme_name):
    # llama.cpp multiplies Q4_0/Q8_0 weights with activations rounded to 8 bits per block of 32
    # (Q8_0), so its logits differ from the reference's (which multiplies in fp32) by up to ~0.45
    # here, measured on these random tiny models (logits up to ~6; their sharp random attention
    # amplifies rounding). Teacher-forced on the reference's tokens, llama.cpp's top token must agree
    # wherever the reference's top-2 margin exceeds twice that bound (random tiny models have few such
    # steps, so overall agreement is bounded too); free-running paths may part at a near-tie.
    model, scheme, _ = tiny_export(tmp_path, family, scheme_name)
    ref_tokens, ref_logits, _, _, forced = run_llama_cpp(tmp_path, model, scheme)
    assert (forced - ref_logits).abs().max() < 0.6
    top2 = ref_logits.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.2
    assert torch.equal(forced.argmax(-1)[clear], ref_tokens[clear])
    assert (forced.argmax(-1) == ref_tokens).sum() >= 20  # of 24; measured 22, 21, 21 (near-ties part)


@needs_llama_cpp
@pytest.mark.parametrize("scheme_name", ["f32", "q4g32-rtn"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_llama_cpp_families_match_reference(tmp_path, family, scheme_name):
    """Each family in llama.cpp against the reference, 56 positions (7 windows of 8) long. The bound
    is the one export derived from a simulation of llama.cpp's arithmetic (Q8_0 activations, f16
    cache, the fp16 GELU table), or 1e-3 where llama.cpp computes the reference's function in fp32.
    Where the model has sliding windows, the reference without them is far from llama.cpp."""
    model, scheme, fields = tiny_export(tmp_path, family, scheme_name)
    steps = 40
    ref_tokens, ref_logits, tokens, logits, forced = run_llama_cpp(tmp_path, model, scheme, steps=steps)
    bound = fields["parity_bounds"]["max_abs_logit"] if "parity_bounds" in fields else 1e-3
    assert (forced - ref_logits).abs().max() <= bound
    if scheme_name == "f32":
        assert torch.equal(tokens, ref_tokens) and (logits - ref_logits).abs().max() <= bound
    else:  # teacher-forced on the reference's tokens, the top token agrees wherever it is clear
        top2 = ref_logits.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
        assert torch.equal(forced.argmax(-1)[clear], ref_tokens[clear])
    if model.spec.has_local_layers and scheme_name == "f32":
        assert 16 + steps > 2 * model.spec.sliding_window
        prompt = (torch.arange(1, 17) * 31 % model.spec.vocab_size).view(1, -1)
        for layer in model.layers:
            layer.self_attn.kv_attention.window = None
        with torch.no_grad():
            unwindowed = model(torch.cat((prompt, ref_tokens[None]), 1))[0][0, 15:-1]
        assert (forced - unwindowed).abs().max() > 10 * bound


@needs_llama_cpp
def test_llama_cpp_gemma3_linear_rope(tmp_path):
    """Gemma 3's global layers with linear RoPE scaling (as its 4B and larger models have) beside
    unscaled local layers with their own base: rope.scaling.* and rope.freq_base_swa in llama.cpp."""
    import gguf

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    _, model = tiny_pair("gemma3", hidden_size=64, intermediate_size=128, query_pre_attn_scalar=16, rope_parameters=rope)
    scheme = get_scheme("f32")
    fields = TARGET.export(model, scheme, tmp_path, ExportContext(model_name="tiny", reference="", context_length=128))
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert reader.fields["gemma3.rope.scaling.factor"].contents() == 8.0
    ref_tokens, ref_logits, tokens, _, forced = run_llama_cpp(tmp_path, model, scheme, steps=40)
    assert torch.equal(tokens, ref_tokens)
    assert (forced - ref_logits).abs().max() <= fields["parity_bounds"]["max_abs_logit"]


@needs_llama_cpp
def test_smollm2_q4_0_in_llama_cpp(tmp_path):
    """The real model: our q4g32-rtn checkpoint as Q4_0, run by llama.cpp, against the reference."""
    from edgeslm.exporter import export_artifact
    from edgeslm.data import load_eval_text
    from edgeslm.loading import load_model
    from edgeslm.model import generate_greedy
    from edgeslm.quantizer import reference_folder

    scheme = get_scheme("q4g32-rtn")
    manifest = export_artifact(None, "gguf", scheme.name, tmp_path / "gguf", verify=False, progress=False)
    assert manifest["ggml_types"] == {"Q4_0": 1 + 7 * 30, "F32": 1 + 2 * 30}  # embedding + 7 per layer
    model, tok, _ = load_model(reference_folder(None, scheme))
    runner = TARGET.load(tmp_path / "gguf", manifest)
    try:
        text = load_eval_text("brown:test")[:2000]
        assert runner.tokenize(text) == tok(text, add_special_tokens=False).input_ids  # same text -> same ids
        prompt = tok(text[:400], add_special_tokens=False, return_tensors="pt").input_ids[:, :64]
        steps = 32
        ref_tokens, ref_logits = generate_greedy(model, prompt, steps, max_len=128)
        tokens, logits = runner.generate_greedy(prompt, steps)
    finally:
        runner.close()
    agree = int((tokens == ref_tokens[0]).long().cumprod(0).sum())
    diff = (logits - ref_logits[0]).abs().max().item()
    print(f"llama.cpp Q4_0 vs reference: identical greedy prefix {agree}/{steps}, max |logit diff| {diff:.3f}")
    assert agree == steps  # measured: 32/32
    assert diff < 2.0  # measured 1.18 (8-bit activations in llama.cpp's Q4_0 x Q8_0 dot products)


def swap_rows(gguf_path, tensor_name: str, i: int, j: int):
    """Swaps rows i and j of a tensor in a GGUF file, in place (any block type: rows are contiguous)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    (tensor,) = [t for t in reader.tensors if t.name == tensor_name]
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # gguf lists dims fastest-first
    row_bytes = int(tensor.n_bytes) // rows
    del reader
    with open(gguf_path, "r+b") as f:
        f.seek(tensor.data_offset + i * row_bytes)
        a = f.read(row_bytes)
        f.seek(tensor.data_offset + j * row_bytes)
        b = f.read(row_bytes)
        f.seek(tensor.data_offset + i * row_bytes)
        f.write(b)
        f.seek(tensor.data_offset + j * row_bytes)
        f.write(a)


def byte_level_folder(folder, family="llama", tokenizer=None, **overrides):
    """A tiny_pair model saved as a Hugging Face folder with a GPT-2 style byte-level BPE tokenizer
    (260 ids), the kind the gguf target carries into tokenizer.ggml.*."""
    from test_run import byte_level_tokenizer

    hf, _ = tiny_pair(family, vocab_size=260, **overrides)
    hf.save_pretrained(str(folder), safe_serialization=True)
    (tokenizer or byte_level_tokenizer()).save_pretrained(str(folder))
    return folder


@needs_llama_cpp
def test_verify_fails_when_two_packed_rows_are_swapped(tmp_path, monkeypatch):
    """The negative test: a Q4_0 artifact whose embedding rows of two prompt tokens are swapped, with
    its manifest re-hashed so that only parity can catch it, fails verify (exit 1) on a bound."""
    import json
    import shutil

    from tiny_export import isolated_cache

    from edgeslm.artifact import write_manifest
    from edgeslm.exporter import export_artifact
    from edgeslm.loading import load_tokenizer
    from edgeslm.parity import PROMPT_TEXT

    isolated_cache(tmp_path, monkeypatch)
    folder = byte_level_folder(tmp_path / "tiny", "llama")
    art = tmp_path / "gguf"
    manifest = export_artifact(folder, "gguf", "q4g32-rtn", art, context=128, prefill_chunk=16, progress=False)
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    bounds = manifest["parity_bounds"]
    assert bounds["max_abs_logit"] < 5 and "Q8_0" in bounds["basis"]
    copy = tmp_path / "swapped"
    shutil.copytree(art, copy)
    ids = load_tokenizer(folder)(PROMPT_TEXT, add_special_tokens=False).input_ids
    a, b = sorted(set(ids), key=ids.count)[-2:]  # the two most frequent prompt tokens
    swap_rows(copy / "model.gguf", "token_embd.weight", a, b)
    m = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in m.items() if k not in ("files", "format", "created", "tools")})
    done = subprocess.run([sys.executable, "-m", "edgeslm.cli.main", "verify", str(copy), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert not result["passed"] and result["failures"]
    assert any("logit diff" in f or "greedy" in f for f in result["failures"])


@needs_llama_cpp
@pytest.mark.parametrize("family", ["stablelm", "phi3"])
def test_edgeslm_run_streams_reference_tokens(tmp_path, monkeypatch, family):
    """`edgeslm run` on a GGUF artifact of a family beyond llama: llama.cpp tokenizes the prompt with
    the exported byte-level BPE vocabulary and streams the reference's greedy tokens and their text."""
    from test_run import byte_level_tokenizer, check_against_reference
    from tiny_export import isolated_cache

    from edgeslm.exporter import export_artifact

    isolated_cache(tmp_path, monkeypatch)
    folder = byte_level_folder(tmp_path / "tiny", family)
    art = tmp_path / "gguf"
    export_artifact(folder, "gguf", "f32", art, context=64, prefill_chunk=16, verify=False, progress=False)
    r = check_against_reference(folder, art, tok=byte_level_tokenizer())
    assert r["runtime"].startswith("llama.cpp") and r["target"] == "gguf"


def test_export_refuses_a_bpe_tokenizer_without_merges(tmp_path):
    """A byte-level BPE tokenizer with no merges cannot be read back by llama.cpp: `edgeslm export`
    refuses it with one line and exit 2, and --out does not appear."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    folder = byte_level_folder(tmp_path / "tiny", "llama", tokenizer=PreTrainedTokenizerFast(tokenizer_object=tk))
    assert_export_refused(folder, tmp_path, "no BPE merges")
