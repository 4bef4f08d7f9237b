"""The WebLLM model library (paged KV cache, own soft-cap attention kernels, sampling functions)
built for the host CPU and driven the way WebLLM's engine drives it, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def gemma2_engine():
    pytest.importorskip("tvm")
    from edgeslm.targets.webgpu.webllm_build import CPUEngine
    from tiny import tiny_pair

    _, dec = tiny_pair("gemma2")  # window 8, attention soft-cap 0.5, final soft-cap 0.2
    return dec.float().eval(), CPUEngine(dec.float().eval(), context=128, prefill_chunk=16)


def test_metadata_names_the_engine_contract(gemma2_engine):
    import json

    _, eng = gemma2_engine
    meta = json.loads(eng.vm["_metadata"]())
    assert meta["kv_state_kind"] == "kv_cache" and meta["prefill_chunk_size"] == 16
    assert meta["quantization"] == "q0f32" and meta["context_window_size"] == 128
    assert [p["name"] for p in meta["params"]][0] == "embed_tokens.weight"
    usage = meta["memory_usage"]
    assert usage["params_bytes"] == sum(4 * int(__import__("numpy").prod(p["shape"])) for p in meta["params"])
    assert usage["kv_cache_bytes"] > 0 and usage["total_bytes"] > usage["params_bytes"]
    for fn in ("embed", "prefill", "decode", "create_tir_paged_kv_cache", "softmax_with_temperature",
               "argsort_probs", "sample_with_top_p", "apply_bitmask_inplace", "apply_penalty_inplace",
               "apply_logit_bias_inplace"):
        assert eng.vm[fn] is not None


def test_chunked_prefill_past_the_window_matches_reference(gemma2_engine):
    """40 positions fed in chunks of 16: ragged (within a chunk), paged (earlier chunks) and the
    merge of the two all run, on local (window 8) and global layers, with both soft-caps."""
    from edgeslm.ops import reference_only

    dec, eng = gemma2_engine
    ids = (torch.arange(1, 41) * 7919 % 97).view(1, -1)
    with reference_only(), torch.no_grad():
        ref, _ = dec(ids, 0, None)
    eng.reset()
    got = eng.prefill_all(ids[0].tolist())
    assert np.abs(got - ref[0].numpy()).max() < 1e-4


def test_engine_greedy_loop_matches_reference(gemma2_engine):
    from edgeslm.model import generate_greedy
    from edgeslm.ops import reference_only

    dec, eng = gemma2_engine
    prompt = (torch.arange(1, 13) * 7919 % 97).view(1, -1)
    with reference_only():
        ref_tokens, ref_logits = generate_greedy(dec, prompt, 40)  # 52 positions: past 6x the window
    tokens, logits = eng.greedy(prompt[0].tolist(), 40)
    assert tokens == ref_tokens[0].tolist()
    assert np.abs(logits - ref_logits[0].numpy()).max() < 1e-4


def test_sampling_functions_pick_the_argmax_at_tiny_temperature(gemma2_engine):
    """The engine's greedy path: softmax at temperature 1e-6, argsort, top-p 1.0 sampling."""
    import tvm

    _, eng = gemma2_engine
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 1, 97)).astype("float32")
    probs = eng.vm["softmax_with_temperature"](tvm.runtime.tensor(logits), tvm.runtime.tensor(np.array([1e-6], "float32")))
    flat = tvm.runtime.tensor(probs.numpy().reshape(1, 97))
    ranked, order = eng.vm["argsort_probs"](flat)
    assert order.numpy()[0, 0] == logits.argmax()
    tok = eng.vm["sample_with_top_p"](ranked, order, tvm.runtime.tensor(np.array([0.7], "float32")),
                                      tvm.runtime.tensor(np.array([0], "int32")),
                                      tvm.runtime.tensor(np.array([1.0], "float32")))
    assert tok.numpy()[0] == logits.argmax()
    # top-p sampling proper: at temperature 1, u = 0.999 lands in the kept prefix's last token
    probs = eng.vm["softmax_with_temperature"](tvm.runtime.tensor(logits), tvm.runtime.tensor(np.array([1.0], "float32")))
    p = probs.numpy().reshape(-1)
    ranked, order = eng.vm["argsort_probs"](tvm.runtime.tensor(p.reshape(1, 97)))
    sorted_p = np.sort(p)[::-1]
    keep = int(np.searchsorted(np.cumsum(sorted_p), 0.5) + 1)
    tok = eng.vm["sample_with_top_p"](ranked, order, tvm.runtime.tensor(np.array([0.999], "float32")),
                                      tvm.runtime.tensor(np.array([0], "int32")),
                                      tvm.runtime.tensor(np.array([0.5], "float32")))
    assert tok.numpy()[0] == np.argsort(-p, kind="stable")[keep - 1]
