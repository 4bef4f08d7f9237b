"""Device profiles, budget files and the roofline estimator (no runtime needed: fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeslm.devices import (BUDGET_KEYS, KINDS, ArtifactFacts, budgets_for, estimate, get_profile,
                             load_budget_file, load_profiles)
from edgeslm.errors import EdgeSLMError
from edgeslm.latency import figures_from_runs, percentile, prompt_ids

SHIPPED = {"host", "browser", "pixel-8", "galaxy-s24", "oneplus-12", "iphone-15-pro", "macbook-m2",
           "android-midrange-6gb"}


def test_shipped_profiles_are_complete_and_cite_sources():
    profiles = load_profiles()
    assert SHIPPED <= set(profiles)
    assert {p.kind for p in profiles.values()} == set(KINDS)
    for p in profiles.values():
        assert p.sources and all(len(s) > 20 for s in p.sources), p.name
        # this machine's profiles (host, browser) judge nothing by default; every real device has budgets
        assert set(BUDGET_KEYS) <= set(p.budgets) or p.name in ("host", "browser"), p.name
        assert 0 < p.usable_app_memory_gb <= p.memory_gb, p.name
        assert p.targets, p.name
    # the host profile's figures were measured on this machine and say so
    assert any("measured" in s for s in profiles["host"].sources)
    assert profiles["macbook-m2"].bandwidth_gbs == 100  # Apple's published figure


def test_user_profile_folder_adds_and_overrides(tmp_path):
    (tmp_path / "mine.toml").write_text(
        'name = "my-board"\nkind = "android"\nmemory_gb = 4\nusable_app_memory_gb = 1.5\nbandwidth_gbs = 12\n'
        'compute_gflops = 40\ntargets = ["executorch"]\nsources = ["vendor datasheet rev B"]\n'
        '[budgets]\nprompt_tokens = 64\nttft_ms = 3000\ndecode_tok_s = 5\npeak_memory_mb = 800\nartifact_mb = 300\n')
    assert get_profile("my-board", [tmp_path]).bandwidth_gbs == 12
    assert get_profile(str(tmp_path / "mine.toml")).name == "my-board"
    with pytest.raises(EdgeSLMError, match="unknown device 'my-board'"):
        get_profile("my-board")
    (tmp_path / "bad.toml").write_text('name = "bad"\nkind = "toaster"\n')
    with pytest.raises(EdgeSLMError, match="has no|kind"):
        load_profiles([tmp_path])


def test_budget_file_overrides_and_rejects_bad_values(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('ttft_ms = 250\n[device.pixel-8]\ndecode_tok_s = 40\nprompt_tokens = 32\n')
    overrides = load_budget_file(f)
    pixel = budgets_for(get_profile("pixel-8"), overrides)
    host = budgets_for(get_profile("host"), overrides)
    assert pixel["ttft_ms"] == 250 and pixel["decode_tok_s"] == 40 and pixel["prompt_tokens"] == 32
    assert host["ttft_ms"] == 250 and "decode_tok_s" not in host  # host has no budget of its own
    for text, match in [("ttft_ms = nan\n", "finite"), ("decode_tok_s = -1\n", "positive"),
                        ("[device.host]\npeak_memory_mb = inf\n", "finite"), ("latency = 3\n", "unknown budget"),
                        ('ttft_ms = "fast"\n', "number"), ("ttft_ms = \n", "not valid TOML"),
                        ("prompt_tokens = 1.5\n", "whole number")]:
        f.write_text(text)
        with pytest.raises(EdgeSLMError, match=match):
            load_budget_file(f)
    with pytest.raises(EdgeSLMError, match="cannot read"):
        load_budget_file(tmp_path / "missing.toml")


def facts_for_tiny(bytes_per_param=4.0):
    from tiny import tiny_pair

    _, dec = tiny_pair("llama")
    params = sum(p.numel() for p in dec.parameters())
    s = dec.spec
    return ArtifactFacts(target="onnx", size_bytes=int(params * bytes_per_param), params=params,
                         embedding_params=s.vocab_size * s.hidden_size, tied=s.tie_embeddings, layers=s.num_layers,
                         heads=s.num_heads, head_dim=s.head_dim, kv_bytes_per_position=2 * s.num_layers *
                         s.num_kv_heads * s.head_dim * 4, local_kv_bytes=0, window=None, context_length=512), dec


def test_artifact_facts_count_the_decoders_parameters(tmp_path):
    """artifact_facts derives the parameter count from config.json; it must equal the Decoder's."""
    from tiny import tiny_pair

    from edgeslm.devices import artifact_facts

    for family in ("llama", "gemma2", "qwen2"):
        hf, dec = tiny_pair(family)
        hf.config.save_pretrained(tmp_path / family)
        facts = artifact_facts(tmp_path / family, {"target": "onnx", "files": {"m.onnx": {"bytes": 1000}}})
        assert facts.params == sum(p.numel() for p in dec.parameters()), family
        cache = dec.new_cache(1, 512)
        full = sum(t.numel() * 4 for t in cache)
        assert facts.kv_bytes_read(512) == full, family  # ring layers capped at their window


def test_roofline_matches_hand_computation_and_scales_the_right_way():
    facts, _ = facts_for_tiny()
    profile = get_profile("pixel-8")
    est = estimate(profile, facts, prompt_tokens=64, decode_tokens=32)
    mid = 64 + 16
    read = facts.weight_bytes_per_token + facts.kv_bytes_read(mid)
    flops = facts.flops_per_token(mid)
    expect = 1 / max(read / (profile.bandwidth_gbs * 1e9), flops / (profile.compute_gflops * 1e9))
    assert est["decode_tok_s"] == pytest.approx(expect, rel=1e-12)
    assert est["runner"] == "estimated"
    # more context -> slower decode; batch 4 reads the weights once for 4 tokens -> more tokens/s
    longer = estimate(profile, facts, prompt_tokens=400, decode_tokens=32)
    assert longer["decode_tok_s"] < est["decode_tok_s"]
    assert estimate(profile, facts, 64, 32, batch=4)["decode_tok_s"] > est["decode_tok_s"]
    # a faster memory system is never slower
    assert estimate(get_profile("macbook-m2"), facts, 64, 32)["decode_tok_s"] >= est["decode_tok_s"]
    assert est["peak_memory_mb"] * 1e6 >= facts.size_bytes + facts.kv_bytes_read(512)


def test_spread_figures_match_numpy():
    rng = np.random.default_rng()
    values = list(rng.uniform(1, 100, size=7))
    assert percentile(values, 90) == pytest.approx(np.percentile(values, 90))
    assert percentile(values, 10) == pytest.approx(np.percentile(values, 10))
    runs = [{"ttft_ms": t, "decode_ms": [d] * 4} for t, d in zip(values, values[::-1])]
    figs = figures_from_runs(runs, decode_tokens=5)
    assert figs["ttft_ms"]["median"] == pytest.approx(np.median(values))
    tok_s = [1e3 / d for d in values[::-1]]
    assert figs["decode_tok_s"]["median"] == pytest.approx(np.median(tok_s))
    assert figs["decode_tok_s"]["p90"] == pytest.approx(np.percentile(tok_s, 10))  # the slow tail
    assert not math.isnan(figs["ttft_ms"]["p90"])


def test_prompt_ids_are_fixed_and_in_range():
    a, b = prompt_ids(97, 50), prompt_ids(97, 50)
    assert a == b and all(16 <= t < 97 for t in a)
    assert torch.tensor(prompt_ids(49152, 128)).max() < 49152
