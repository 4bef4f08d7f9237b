"""The decoder against transformers' eager implementation, family by family."""

import pytest
import torch

from edgeslm.model import generate_greedy
from tiny import FAMILIES, tiny_pair

STEPS = 48


def hf_greedy(hf, prompt, steps):
    """transformers' greedy loop, recomputing the whole prefix each step (no cache involved)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = hf(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), dim=1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    hf, ours = tiny_pair(family)
    ids = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
    assert (expected - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 1], ids=["prefill+decode", "token-by-token"])
def test_greedy_tokens_match_transformers(family, chunk):
    hf, ours = tiny_pair(family)
    prompt = torch.randint(3, 97, (1, 6))
    window = ours.spec.sliding_window
    if window:  # decode at least 3x past the window, so every local layer wraps
        assert prompt.shape[1] + STEPS >= 3 * window
    expected = hf_greedy(hf, prompt, STEPS)
    got, logits = generate_greedy(ours, prompt, STEPS, chunk=chunk)
    assert torch.equal(got, expected)
    # and the cached logits equal a full recompute of the same sequence
    full = torch.cat((prompt, got), dim=1)
    with torch.no_grad():
        ref = hf(full).logits[:, prompt.shape[1] - 1 : -1]
    assert (ref - logits).abs().max().item() < 1e-4


def test_ring_buffer_is_bounded_and_long_prefill_chunk_is_exact():
    """A prefill chunk longer than the window, starting past it, over a ring smaller than the sequence."""
    hf, ours = tiny_pair("gemma2")
    window = ours.spec.sliding_window
    ids = torch.randint(3, 97, (1, 5 * window))
    cache = ours.new_cache(1, ids.shape[1])
    local_sizes = {c.shape[2] for c, local in zip(cache[::2], ours.spec.layer_is_local) if local}
    assert local_sizes == {window}
    with torch.no_grad():
        expected = hf(ids).logits
        first = 3 * window - 3
        a, cache = ours(ids[:, :first], 0, cache)
        b, cache = ours(ids[:, first:], first, cache)  # 2*window+3 tokens at once
    got = torch.cat((a, b), dim=1)
    assert (expected - got).abs().max().item() < 1e-4


def test_window_and_softcap_matter():
    """Guards the tests above: flipping the window or the soft-cap must change the logits."""
    hf, ours = tiny_pair("gemma2")
    ids = torch.randint(3, 97, (1, 40))
    with torch.no_grad():
        base, _ = ours(ids)
        for layer in ours.layers:
            layer.self_attn.kv_attention.window = None
        no_window, _ = ours(ids)
    assert (base - no_window).abs().max() > 1e-3
    _, ours = tiny_pair("gemma2", attn_logit_softcapping=None)
    with torch.no_grad():
        no_cap, _ = ours(ids)
    assert (base - no_cap).abs().max() > 1e-3
