"""Core ML target on tiny Gemma 2 (attn soft-cap 0.5, final 0.2, window 8): export through the
shared `export_artifact`, verify through the Linux MIL executor, inspect the package.

Context 64 and prefill chunk 16 (> window 8), 32 greedy steps: the rings wrap several times, and
a prefill chunk overwrites a whole ring at once.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from edgeslm.targets.coreml import TARGET, CoreMLStep, inspect_package  # noqa: E402

CONTEXT, CHUNK, STEPS = 64, 16, 32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_export import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("coreml") / "gemma2", "gemma2")


def _export(folder, scheme, out):
    """Export through the shared path, then the shared verify (Brown perplexity on 512 tokens, to
    keep CI short); returns the manifest with the verify result under "parity"."""
    from edgeslm.exporter import export_artifact
    from edgeslm.parity import verify_folder

    manifest = export_artifact(folder, "coreml", scheme, out, context=CONTEXT, prefill_chunk=CHUNK, verify=False,
                               progress=False)
    manifest["parity"] = verify_folder(out, steps=STEPS, ppl_count=512, progress=False, raise_on_failure=False)
    return manifest


@pytest.fixture(scope="module")
def f16_artifact(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "f16"
    return out, _export(tiny_folder, "f16", out)


@pytest.fixture(scope="module")
def int4_artifact(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "q4"
    return out, _export(tiny_folder, "q4g32-rtn", out)


def test_wrapper_is_the_decoder_function():
    """CoreMLStep (what we trace) computes exactly Decoder.forward with its cache, past the window."""
    from tiny import tiny_pair

    _, dec = tiny_pair("gemma2")
    step = CoreMLStep(copy.deepcopy(dec), CONTEXT, cache_dtype=torch.float32).eval()
    ids = torch.randint(0, dec.spec.vocab_size, (1, 44), generator=torch.Generator().manual_seed(0))
    cache = dec.new_cache(1, CONTEXT)
    with torch.no_grad():
        for start, t in ((0, CHUNK), (CHUNK, CHUNK), *((p, 1) for p in range(2 * CHUNK, 44))):
            want, cache = dec(ids[:, start : start + t], start, cache)
            got = step(ids[:, start : start + t].int(), torch.tensor([start], dtype=torch.int32))
            assert torch.equal(got, want), (start, (got - want).abs().max())


def test_f16_verify_same_greedy_tokens(f16_artifact):
    out, manifest = f16_artifact
    p = manifest["parity"]
    assert p["passed"], p["failures"]
    assert "NOT Apple's Core ML runtime" in p["runtime"]
    assert p["steps"] == STEPS and p["sliding_window"] == 8
    # teacher-forced: prefill then 32 decode steps past the window; every step agrees or is a near-tie
    # (reference top-2 margin within the tie tolerance: logits are squeezed into (-0.2, 0.2))
    assert p["greedy_disagree"] == 0 and p["greedy_agree"] + p["greedy_ties"] == STEPS
    assert p["greedy_agree"] >= STEPS - 4
    assert abs(p["ppl_rel_diff"]) <= 0.02
    assert p["max_abs_logit_diff"] < 0.02  # fp16 compute on logits in (-0.2, 0.2)
    print(f"\nf16: max|dlogit| {p['max_abs_logit_diff']:.4g}, agree {p['greedy_agree']} ties {p['greedy_ties']}, "
          f"free-running prefix {p['free_running_identical_prefix']}/{STEPS}, "
          f"ppl {p['ppl_artifact']:.4f} vs {p['ppl_reference']:.4f}")


def test_f16_package_layout(f16_artifact):
    out, manifest = f16_artifact
    facts = TARGET.inspect(out, manifest)
    assert set(facts["functions"]) == {"prefill", "decode"}
    assert facts["functions"]["prefill"]["inputs"]["tokens"] == [1, CHUNK]
    assert facts["functions"]["decode"]["inputs"]["tokens"] == [1, 1]
    assert facts["minimum_deployment_target"] == "iOS 18 / macOS 15"
    assert facts["weight_files"] == ["Data/com.apple.CoreML/weights/weight.bin"]  # one shared weight file
    # one state per cache tensor: global layers hold the context, local (ring) layers the window
    assert len(facts["states"]) == 8
    assert {tuple(s)[2] for s in facts["states"].values()} == {8, CONTEXT}
    for op in ("read_state", "slice_update", "coreml_update_state"):
        assert facts["op_inventory"].get(op, 0) > 0
    assert manifest["coreml"]["compute_precision"] == "float16"
    # an f16 package keeps float weights; called quantized it would be a failure
    assert facts["float_weight_consts"] and not facts["quantized_float_weight_failure"]
    assert TARGET.inspect(out, {**manifest, "scheme": "q4g32-rtn"})["quantized_float_weight_failure"]


def test_executor_covers_every_op_of_the_packages(f16_artifact, int4_artifact):
    from test_coreml_executor import CASES

    from edgeslm.targets.coreml_executor import STATE_OPS

    ops = set(inspect_package(f16_artifact[0] / "model.mlpackage")["op_inventory"])
    ops |= set(inspect_package(int4_artifact[0] / "model.mlpackage")["op_inventory"])
    untested = {o for o in ops if o not in CASES and o not in STATE_OPS and o != "const" and not o.startswith("constexpr_")}
    assert not untested, f"ops without a per-op test against coremltools: {sorted(untested)}"


def test_int4_package_is_our_codes(int4_artifact, tiny_folder):
    out, manifest = int4_artifact
    facts = TARGET.inspect(out, manifest)
    # every linear (and the tied embedding / lm_head) reads an int4 constexpr, none a float const
    assert facts["float_weight_consts"] == [] and not facts["quantized_float_weight_failure"]
    n_linear = 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    assert facts["compressed_weights"] == {"constexpr_blockwise_shift_scale:uint4": 2 * (n_linear + 1)}
    assert facts["op_inventory"]["linear"] == 2 * (n_linear + 1)
    # the codes and scales in the package are the checkpoint's, byte for byte
    from edgeslm.loading import load_quantized
    from edgeslm.kernels.int4_matmul import unpack_int4
    from edgeslm.targets.coreml_executor import load_program

    model, _ = load_quantized(manifest["reference"])
    prog, _ = load_program(out / "model.mlpackage")
    packed = {op.name: op for op in prog.functions["decode"].operations if op.op_type == "constexpr_blockwise_shift_scale"}
    op = packed["dec_layers_2_mlp_down_proj_weight_to_fp16_q"]
    m = model.layers[2].mlp.down_proj
    assert np.array_equal(op.data.val.astype(np.uint8), unpack_int4(m.qweight).numpy())
    assert np.array_equal(op.scale.val, m.scales.numpy())
    assert (op.offset.val.astype(np.uint8) == 8).all()  # symmetric: zero point 8


def test_int4_perplexity_within_2_percent(int4_artifact):
    p = int4_artifact[1]["parity"]
    assert p["passed"], p["failures"]
    assert abs(p["ppl_rel_diff"]) <= 0.02
    print(f"\nint4: ppl {p['ppl_artifact']:.4f} vs reference {p['ppl_reference']:.4f} ({100 * p['ppl_rel_diff']:+.3f}%), "
          f"package {p['artifact_bytes']} bytes")


def test_runner_rejects_positions_past_the_context(f16_artifact):
    from edgeslm.errors import EdgeSLMError

    out, manifest = f16_artifact
    runner = TARGET.load(out, manifest)
    with pytest.raises(EdgeSLMError, match="exceed the package's context"):
        runner.decode(1, CONTEXT)


def test_palettize4_refuses_quantized_schemes(tiny_folder, tmp_path):
    from edgeslm.schemes import get_scheme
    from edgeslm.targets.base import ExportContext
    from edgeslm.errors import EdgeSLMError

    ctx = ExportContext(model_name="tiny", reference=str(tiny_folder), options={"compression": "palettize4"})
    with pytest.raises(EdgeSLMError, match="palettize4"):
        TARGET.export(None, get_scheme("q4g32-rtn"), tmp_path / "x", ctx)


def test_f32_without_a_final_softcap_meets_its_derived_bounds(tmp_path):
    """Logits not squashed by a final soft-cap, so errors show: an f32 package (fp16 KV state) meets
    the bounds derived from its arithmetic, and those bounds say where they come from."""
    from tiny_export import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "gemma2", "gemma2", final_logit_softcapping=None)
    manifest = _export(folder, "f32", tmp_path / "f32")
    p, bounds = manifest["parity"], manifest["parity_bounds"]
    assert p["passed"], p["failures"]
    assert "fp16 KV-cache state" in bounds["basis"] and p["bounds"] == bounds
    assert p["max_abs_logit_diff"] <= bounds["max_abs_logit"] < 0.5
