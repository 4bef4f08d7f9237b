"""ExecuTorch target: one forward(tokens, input_pos) method with dynamic T and the LLM runner's
constant methods, run by executorch.runtime and by the wheel's own TextLLMRunner.

Tiny Llama (the runtime's llama::update_cache + llama::custom_sdpa) and tiny Gemma 2 (window 8,
both soft-caps: ring buffer + traced attention), f32 and int4 as 8-bit dynamic activations x our
int4 codes with bounds derived at export."""

from __future__ import annotations

import json
import string

import pytest
import torch

from tiny import tiny_pair
from tiny_export import isolated_cache


def char_bpe_tokenizer():
    """The tiny vocab (97 characters) as a BPE without merges: the same ids as tiny_export's
    character tokenizer, in a tokenizer.json that ExecuTorch's runner (pytorch-labs tokenizers) loads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["[UNK]", "\n"] + [c for c in string.printable if 32 <= ord(c) < 127]
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="[UNK]", eos_token="[UNK]")


def model_folder(root, family):
    # end of sequence: [UNK] (id 0), a rare pick for the tiny models
    hf, _ = tiny_pair(family, bos_token_id=0, eos_token_id=0)
    folder = root / f"tiny-{family}"
    hf.save_pretrained(str(folder), safe_serialization=True)
    char_bpe_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("et")
    isolated_cache(tmp, mp)
    yield tmp
    mp.undo()


@pytest.fixture(scope="module")
def artifacts(tiny):
    """Exported once per module: {(family, scheme): (folder, manifest)}."""
    from edgeslm.exporter import export_artifact

    made = {}

    def get(family, scheme):
        key = (family, scheme)
        if key not in made:
            folder = tiny / f"tiny-{family}"
            if not folder.exists():
                model_folder(tiny, family)
            out = tiny / f"et-{family}-{scheme}"
            made[key] = (out, export_artifact(folder, "executorch", scheme, out, context=128, prefill_chunk=16,
                                              progress=False))
        return made[key]

    return get


def test_torchao_weight_is_our_int4():
    from edgeslm.schemes.int4 import Int4Linear, fill_int4, int4_grid_rtn
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
    from edgeslm.schemes.int4 import Int4Linear, fill_int4, int4_grid_rtn
    from edgeslm.targets.executorch import Linear8da4w

    torch.manual_seed(0)
    m = Int4Linear(96, 16, 32, True, bias=True)
    fill_int4(m, *int4_grid_rtn(torch.randn(16, 96), 32, True))
    m.bias.data.normal_()
    sliced = Linear8da4w(m, [torch.tensor([0, 2]), torch.tensor([1])])
    x = torch.randn(3, 96)
    y = sum(x.index_select(-1, getattr(sliced, f"channels_{i}")) @ getattr(sliced, f"weight_{i}").dequantize().T
            for i in range(sliced.num_bins)) + m.bias
    torch.testing.assert_close(y, x @ m.dequantized().T + m.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_power_of_two_smoothing_is_exact(family, monkeypatch):
    """Without the int8 rounding of activations (every 8da4w weight applied dequantized, in float),
    the smoothed, fused, binned program computes the reference's logits: the powers of two divided
    out at the norms and v rows (with Qwen 2's v bias) are multiplied back in the weight scales
    exactly. Head dim 32 makes o_proj's input groups whole heads, so GQA's shared v rows are smoothed."""
    import copy

    from edgeslm.ops import reference_only
    from edgeslm.quantizer import quantize_model
    from edgeslm.schemes import get_scheme
    from edgeslm.targets.executorch import Linear8da4w, RmsNormLinearMean, et_ready, fuse_projections

    def float_forward(self, x):
        y = 0
        for i in range(self.num_bins):
            channels = getattr(self, f"channels_{i}")
            xi = x if channels is None else x.index_select(-1, channels)
            y = y + xi @ getattr(self, f"weight_{i}").dequantize().T
        return y if self.bias is None else y + self.bias

    _, ref = tiny_pair(family, head_dim=32)
    quantize_model(ref, get_scheme("q4g32-rtn"), progress=False)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    prepared = copy.deepcopy(ref)
    fuse_projections(prepared)
    prepared = et_ready(prepared.eval(), ids)
    norms = [m for m in prepared.modules() if isinstance(m, RmsNormLinearMean)]
    assert sum(not torch.all(m.scale == m.scale.round()) or bool((m.scale.abs() > 4).any()) for m in norms) >= 1
    monkeypatch.setattr(Linear8da4w, "forward", float_forward)
    with torch.no_grad(), reference_only():
        want = ref(ids)[0]
        got = prepared(ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_remainder_of_negative_ring_positions():
    """ExecuTorch's portable remainder truncates negative int64; the decoder keeps dividends >= 0."""
    from edgeslm.model import ring_positions

    assert ring_positions(torch.tensor(0), 8).tolist() == [-1] * 8
    assert ring_positions(torch.tensor(3), 8).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    assert ring_positions(torch.tensor(10), 8).tolist() == [8, 9, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_program_attention_and_fused_projections_are_the_reference(family):
    """Eagerly, with the program's KV modules swapped in (custom ops, ring, traced) and q/k/v and
    gate/up fused, chunks of any length (1, < window, > window) give the reference's logits."""
    import copy

    from edgeslm.ops import reference_only
    from edgeslm.targets.executorch import fuse_projections
    from edgeslm.targets.executorch_attention import swap_in_program_attention

    _, ref = tiny_pair(family)
    ours = copy.deepcopy(ref)
    assert fuse_projections(ours) == 2 * ref.spec.num_layers
    swap_in_program_attention(ours, 64)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), reference_only():
        want = ref(ids)[0]
        pieces, pos = [], 0
        for n in (11, 1, 1, 3, 20, 1, 2, 1):
            pieces.append(ours(ids[:, pos : pos + n], torch.tensor(pos), None)[0])
            pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), want, rtol=1e-4, atol=1e-4)


def generate_text_llm_runner(folder, manifest, prompt: str, steps: int) -> list[str]:
    """Greedy pieces from the executorch wheel's own TextLLMRunner, the artifact unchanged."""
    from edgeslm.targets.executorch import load_runtime_ops
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    load_runtime_ops()  # the kernels an app links: llama custom ops, quantized ops
    runner = TextLLMRunner(str(folder / manifest["program"]), str(folder / manifest["tokenizer_file"]),
                           str(folder / manifest["weights"]))
    pieces = []
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=steps, temperature=0.0), pieces.append)
    return pieces


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_text_llm_runner_generates_the_reference_tokens(artifacts, family):
    """TextLLMRunner(model_path, tokenizer_path, data_path) loads the .pte, tokenizer.json and .ptd as exported and
    decodes greedily what the reference decodes; Gemma 2 (window 8, soft-caps) 4x past its window."""
    from edgeslm.loading import load_model
    from edgeslm.model import generate_greedy
    from edgeslm.ops import reference_only

    folder, manifest = artifacts(family, "f32")
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    meta = manifest["llm_metadata"]
    assert meta["get_max_context_len"] == 128 and meta["get_max_seq_len"] == 128 and meta["enable_dynamic_shape"]
    assert meta["use_kv_cache"] and meta["get_vocab_size"] == 97
    if family == "llama":  # no soft-cap: every layer on the runtime's own attention ops
        assert list(manifest["attention"]) == ["llama::update_cache + llama::custom_sdpa"]
    else:
        assert set(manifest["attention"]) == {"ring (traced attention)", "traced attention (soft-cap)"}
    prompt = "The committee met on Tuesday."
    steps = 40
    pieces = generate_text_llm_runner(folder, manifest, prompt, steps)
    model, tok, _ = load_model(manifest["reference"])
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with reference_only():
        want, _ = generate_greedy(model, ids, steps, max_len=128)
    want = want[0].tolist()
    # the runner stops at an end-of-sequence id (get_eos_ids): up to there, the same tokens
    n = len(pieces)
    assert n == steps or want[n - 1] in meta["get_eos_ids"] or want[n] in meta["get_eos_ids"]
    assert n >= 30 and pieces == [tok.decode([t]) for t in want[:n]]
    if family == "gemma2":
        assert ids.shape[1] + n >= 4 * model.spec.sliding_window


def test_int4_parity_with_derived_bounds(artifacts):
    """int4 (8-bit dynamic activations): the manifest records bounds derived from the simulation,
    with their basis, and the artifact meets them; perplexity within 1% of the int4 reference."""
    folder, manifest = artifacts("gemma2", "q4g32-rtn")
    bounds, parity = manifest["parity_bounds"], manifest["parity"]
    assert parity["passed"], parity["failures"]
    assert parity["bounds"] == bounds and "simulated" in bounds["basis"]
    assert 0 < bounds["max_abs_logit"] and parity["max_abs_logit_diff"] <= bounds["max_abs_logit"]
    assert abs(parity["ppl_rel_diff"]) < 0.01
    assert manifest["fused_projections"] == 8 and manifest["activation_ranges"]["linears"] == 4 * 4 + 1
    assert manifest["lowering"]["forward"]["delegate_calls"] >= 1


def _rewrite_manifest(folder, manifest):
    from edgeslm.artifact import write_manifest

    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("format", "created", "tools", "files")})


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_fails_a_pte_with_swapped_weight_rows(artifacts, tmp_path, capsys):
    """Two rows of the packed int4 table swapped inside the weights file (every input group of both
    rows, wherever its bin stores it), the manifest re-hashed so the hash check passes: verify
    exits 1 naming the failed bound (logits, tokens or perplexity)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from edgeslm.artifact import read_manifest
    from edgeslm.cli.main import main
    from edgeslm.parity import prompt_ids
    from tiny_export import char_tokenizer

    src, manifest = artifacts("gemma2", "q4g32-rtn")
    folder = _copy(src, tmp_path / "swapped")
    state = {}
    for f in Path(manifest["reference"]).glob("*.safetensors"):
        state.update(load_file(str(f)))
    table = next(v for k, v in state.items() if "embed_tokens" in k and k.endswith("qweight"))
    a, b = prompt_ids(char_tokenizer(), 97, 2)[0].tolist()
    data = bytearray((folder / manifest["weights"]).read_bytes())
    group_bytes = 16  # 32 int4 codes
    for g in range(0, table.shape[1], group_bytes):
        piece_a, piece_b = bytes(table[a, g : g + group_bytes].numpy()), bytes(table[b, g : g + group_bytes].numpy())
        at_a, at_b = data.find(piece_a), data.find(piece_b)
        assert at_a >= 0 and at_b >= 0 and data.count(piece_a) == 1
        data[at_a : at_a + group_bytes], data[at_b : at_b + group_bytes] = piece_b, piece_a
    (folder / manifest["weights"]).write_bytes(bytes(data))
    _rewrite_manifest(folder, read_manifest(folder))
    code = main(["verify", str(folder), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and not out["passed"]
    assert any(("logit diff" in f) or ("perplexity" in f) or ("greedy" in f) for f in out["failures"]), out["failures"]


def test_tied_table_is_stored_once_and_the_check_can_fail(artifacts):
    """The int4 table's codes are one blob of the weights file, gathered by the embedding and
    multiplied by XNNPACK's lm_head; codes that differ from XNNPACK's blob fail the check."""
    from edgeslm.errors import CheckFailed
    from edgeslm.targets.executorch import Embedding8da4w, tied_table_stored_once

    folder, manifest = artifacts("gemma2", "q4g32-rtn")
    assert manifest["tied_table"].startswith("stored once"), manifest.get("tied_table")
    from edgeslm.loading import load_model
    from edgeslm.targets.executorch import calibration_for, et_ready, fuse_projections

    model, tok, _ = load_model(manifest["reference"])  # prepared as export prepares it: the same bins
    fuse_projections(model)
    prepared = et_ready(model.eval(), calibration_for(model, tok, manifest["context_length"]))
    assert isinstance(prepared.embed_tokens, Embedding8da4w)
    assert tied_table_stored_once(prepared, folder / manifest["weights"]) == manifest["tied_table"]
    row = bytes(prepared.embed_tokens.codes_0[5].numpy())
    assert (folder / manifest["weights"]).read_bytes().count(row) == 1
    assert row not in (folder / manifest["program"]).read_bytes()
    prepared.embed_tokens.codes_0[0, 0] ^= 0x11
    with pytest.raises(CheckFailed, match="holds the tied table's bin 0 twice"):
        tied_table_stored_once(prepared, folder / manifest["weights"])


def test_verify_fails_constant_methods_that_disagree_with_the_manifest(artifacts, tmp_path, capsys):
    from edgeslm.artifact import read_manifest
    from edgeslm.cli.main import main

    src, _ = artifacts("llama", "f32")
    folder = _copy(src, tmp_path / "edited")
    manifest = read_manifest(folder)
    manifest["llm_metadata"]["get_max_context_len"] = 4096
    _rewrite_manifest(folder, manifest)
    code = main(["verify", str(folder)])
    captured = capsys.readouterr()
    assert code == 1
    assert "get_max_context_len returns 128, the manifest says 4096" in captured.out + captured.err


def test_verify_fails_a_pte_without_the_runner_methods(artifacts, tmp_path, capsys):
    """A program with only forward (no constant methods) in place of the artifact's: exit 1, named."""
    from executorch.exir import to_edge

    from edgeslm.artifact import read_manifest
    from edgeslm.cli.main import main

    class Forward(torch.nn.Module):
        def forward(self, tokens, input_pos):
            return torch.zeros(1, tokens.shape[1], 97) + input_pos.float()

    src, _ = artifacts("llama", "f32")
    folder = _copy(src, tmp_path / "bare")
    ep = torch.export.export(Forward(), (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])))
    (folder / "model.pte").write_bytes(to_edge(ep).to_executorch().buffer)
    _rewrite_manifest(folder, read_manifest(folder))
    code = main(["verify", str(folder)])
    captured = capsys.readouterr()
    assert code == 1
    assert "lacks the method(s) ExecuTorch's LLM runner needs: get_max_seq_len" in captured.out + captured.err


def test_runner_refuses_positions_past_the_context(artifacts):
    from edgeslm.errors import EdgeSLMError
    from edgeslm.targets.registry import get_target

    folder, manifest = artifacts("llama", "f32")
    runner = get_target("executorch").load(folder, manifest)
    runner.reset()
    runner.prefill(torch.zeros(1, 120, dtype=torch.long), 0)
    with pytest.raises(EdgeSLMError, match="exceed the artifact's context of 128"):
        runner.prefill(torch.zeros(1, 9, dtype=torch.long), 120)


@pytest.mark.slow
def test_smollm2_text_llm_runner_32_tokens():
    """SmolLM2-135M q4g32-gptq as exported by edgeslm (folder in $EDGESLM_ET_SMOLLM2, e.g. from
    `edgeslm export smollm2-135m --target executorch --scheme q4g32-gptq --out F`): the wheel's
    TextLLMRunner generates 32 greedy tokens equal to the int4 reference's."""
    import os
    from pathlib import Path

    from edgeslm.artifact import read_manifest
    from edgeslm.loading import load_model
    from edgeslm.model import generate_greedy
    from edgeslm.ops import reference_only

    folder = os.environ.get("EDGESLM_ET_SMOLLM2")
    if not folder:
        pytest.skip("set EDGESLM_ET_SMOLLM2 to an exported SmolLM2 q4g32-gptq ExecuTorch folder (export takes minutes)")
    folder = Path(folder)
    manifest = read_manifest(folder)
    prompt = "The capital of France is"
    pieces = generate_text_llm_runner(folder, manifest, prompt, 32)
    model, tok, _ = load_model(manifest["reference"])
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with reference_only():
        want, _ = generate_greedy(model, ids, 32, max_len=manifest["context_length"])
    want = want[0].tolist()
    eos = manifest["llm_metadata"].get("get_eos_ids", [])
    n = len(pieces)
    assert n == 32 or want[n - 1] in eos or want[n] in eos
    assert "".join(pieces) == tok.decode(want[:n])


def test_lowering_reports_each_xnnpack_partition_and_restores_the_backend():
    """partition_progress says how many XNNPACK partitions lowering compiles and reports each one as
    it is compiled; XnnpackBackend is as before afterwards."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir import to_edge_transform_and_lower

    from edgeslm.targets.executorch import partition_progress

    class TwoPartitions(torch.nn.Module):  # a cumsum (not delegated) between two linears
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    before = dict(XnnpackBackend.__dict__)
    said = []
    exported = torch.export.export(TwoPartitions().eval(), (torch.randn(2, 8),))
    with partition_progress(said.append):
        to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    assert said[0] == "compiling 2 XNNPACK partitions"
    assert [s.split(" compiled")[0] for s in said[1:]] == ["XNNPACK partition 1/2", "XNNPACK partition 2/2"]
    assert dict(XnnpackBackend.__dict__) == before
