"""kernels/softcap_attention.py: the Triton kernels against attention_reference.

Fresh random inputs every run (no fixed seed), outputs poisoned with NaN before each launch, few
large blocks (interpreter time grows with programs x loop trips) but blocks that do not divide
the sequence, so the edges are exercised.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
from edgeslm.kernels.softcap_attention import attention, attention_reference  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# max abs error against the reference, outputs are O(1): a few output ulps of the dtype
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32, device=DEVICE).to(dtype)


def run_both(q, k, v, q_pos, k_pos, **kw):
    """-> (kernel output, reference output); the kernel writes into a NaN-poisoned tensor."""
    cfg = {n: kw.pop(n) for n in ("block_m", "block_n", "num_splits", "block_stats") if n in kw}
    out = torch.full_like(q, float("nan"))
    got = attention(q, k, v, q_pos, k_pos, out=out, **kw, **cfg)
    assert got.data_ptr() == out.data_ptr()
    want = attention_reference(q, k, v, q_pos, k_pos, **kw)
    assert not torch.isnan(want).any()
    return got, want


def assert_matches(got, want, dtype):
    assert not torch.isnan(got).any(), "kernel left poisoned (unwritten) outputs"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype], f"max error {err:.3g} > {TOL[dtype]:.3g}"


def global_cache(b, hkv, max_len, d, written, dtype):
    """A global layer's cache: slot s holds position s, -1 beyond what was written."""
    k, v = rand(b, hkv, max_len, d, dtype=dtype), rand(b, hkv, max_len, d, dtype=dtype)
    idx = torch.arange(max_len, device=DEVICE)
    return k, v, torch.where(idx < written, idx, -1)


def ring_positions(written, slots):
    """Mirror of edgeslm.model.ring_positions: position p lives in slot p % slots."""
    idx = torch.arange(slots, device=DEVICE)
    pos = (written - 1) - torch.remainder(written - 1 - idx, slots)
    return torch.where(pos >= 0, pos, -1)


# (Hq, Hkv): one and eight q heads per kv head
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(2, 2), (8, 1)])
@pytest.mark.parametrize("softcap,window", [(None, None), (1.0, 5), (1.0, 200), (None, 11)])
def test_prefill_at_nonzero_start_over_cache(dtype, heads, softcap, window):
    hq, hkv = heads
    start, t, max_len, d = 19, 21, 48, 64  # T and S not multiples of the 16 / 32 blocks
    k, v, k_pos = global_cache(1, hkv, max_len, d, start + t, dtype)
    q = rand(1, hq, t, d, dtype=dtype)
    q_pos = torch.arange(start, start + t, device=DEVICE)
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.125, softcap=softcap, window=window, block_m=32, block_n=32)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("d", [64, 128, 256, 96])
def test_head_dims(d):
    """64/128/256 as in the spec; 96 (Phi-3) is padded to 128 inside the kernel."""
    k, v, k_pos = global_cache(1, 1, 40, d, 23, torch.float16)
    q = rand(1, 2, 23, d, dtype=torch.float16)
    q_pos = torch.arange(23, device=DEVICE)
    got, want = run_both(q, k, v, q_pos, k_pos, scale=d ** -0.5, softcap=1.5, window=7, block_m=64, block_n=32)
    assert_matches(got, want, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)])
def test_decode_split_kv_over_global_cache(dtype, heads):
    hq, hkv = heads
    b, max_len, written, d = 2, 100, 70, 64
    k, v, k_pos = global_cache(b, hkv, max_len, d, written, dtype)
    q = rand(b, hq, 1, d, dtype=dtype)
    q_pos = torch.tensor([written - 1], device=DEVICE)
    stats = []
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.125, softcap=2.0, window=None,
                         block_n=16, num_splits=3, block_stats=stats)
    assert_matches(got, want, dtype)
    per_split = stats[0].sum(dim=(1, 2)) // (b * hkv)
    # 7 blocks of 16, interleaved over 3 splits: {0, 3, 6}, {1, 4}, {2, 5}; slots >= 70 are empty,
    # so blocks 5 and 6 are never computed
    assert per_split.tolist() == [2, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("written", [5, 12, 31])
def test_decode_ring_buffer(dtype, written):
    """A local layer at decode: window 12 kept in a 12-slot ring, rotated once `written` > 12."""
    window, d = 12, 64
    k, v = rand(1, 2, window, d, dtype=dtype), rand(1, 2, window, d, dtype=dtype)
    k_pos = ring_positions(written, window)
    q = rand(1, 8, 1, d, dtype=dtype)
    q_pos = torch.tensor([written - 1], device=DEVICE)
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.125, softcap=1.0, window=window, block_n=16, num_splits=1)
    assert_matches(got, want, dtype)


def test_prefill_local_layer_ring_then_new_keys():
    """A local layer at prefill attends over cat(old ring, new keys): positions out of slot order."""
    window, start, t, d = 8, 13, 19, 64
    ring_k, ring_v = rand(1, 1, window, d, dtype=torch.float32), rand(1, 1, window, d, dtype=torch.float32)
    k = torch.cat((ring_k, rand(1, 1, t, d, dtype=torch.float32)), dim=2)
    v = torch.cat((ring_v, rand(1, 1, t, d, dtype=torch.float32)), dim=2)
    q_pos = torch.arange(start, start + t, device=DEVICE)
    k_pos = torch.cat((ring_positions(start, window), q_pos))
    q = rand(1, 4, t, d, dtype=torch.float32)
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.2, softcap=0.7, window=window, block_m=32, block_n=16)
    assert_matches(got, want, torch.float32)


def test_masked_blocks_are_skipped():
    """Counts the KV blocks each program computed: exactly those the causal + window mask keeps."""
    t, window, bm, bn = 96, 20, 16, 16
    k, v, k_pos = global_cache(1, 1, t, 64, t, torch.float32)
    q = rand(1, 1, t, 64, dtype=torch.float32)
    q_pos = torch.arange(t, device=DEVICE)
    stats = []
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.125, window=window, block_m=bm, block_n=bn, block_stats=stats)
    assert_matches(got, want, torch.float32)
    expected = []
    for m0 in range(0, t, bm):
        lo, hi = m0, min(m0 + bm, t) - 1  # query positions of the block
        expected.append(sum(1 for n0 in range(0, t, bn) if n0 <= hi and n0 + bn - 1 > lo - window))
    assert stats[0].flatten().tolist() == expected
    assert sum(expected) < (t // bm) * (t // bn) // 2  # well under the dense count


@pytest.mark.parametrize("flip", ["softcap", "window"])
def test_flipped_softcap_or_window_is_caught(flip):
    """The kernel follows the setting it is given: its output matches the reference computed with
    that setting and is far from the reference computed with the setting flipped."""
    t, d = 40, 64
    k, v, k_pos = global_cache(1, 2, t, d, t, torch.float32)
    q = rand(1, 4, t, d, dtype=torch.float32) * 3
    q_pos = torch.arange(t, device=DEVICE)
    kw = dict(scale=0.125, softcap=1.0, window=6)
    got, want = run_both(q, k, v, q_pos, k_pos, **kw, block_m=64, block_n=64)
    assert_matches(got, want, torch.float32)
    flipped = dict(kw, **({"softcap": None} if flip == "softcap" else {"window": None}))
    other = attention_reference(q, k, v, q_pos, k_pos, **flipped)
    assert (got - other).abs().max().item() > 100 * TOL[torch.float32]


@pytest.mark.parametrize("written", [3, 40, 200])
def test_decode_splits_share_the_live_prefix(written):
    """A cache of 256 slots with only a prefix written: interleaved splits each compute only their
    live blocks, so the work is spread over all splits; three calls in a row re-arm the tickets."""
    from edgeslm.kernels._tickets import TICKETS

    b, hkv, hq, d, max_len, bn, splits = 1, 2, 4, 32, 256, 16, 5
    for _ in range(3):
        k, v, k_pos = global_cache(b, hkv, max_len, d, written, torch.float32)
        q = rand(b, hq, 1, d, dtype=torch.float32)
        q_pos = torch.tensor([written - 1], device=DEVICE)
        stats = []
        got, want = run_both(q, k, v, q_pos, k_pos, scale=0.2, softcap=1.5, block_n=bn, num_splits=splits,
                             block_stats=stats)
        assert_matches(got, want, torch.float32)
        live = -(-written // bn)
        expected = [len(range(sp, live, splits)) for sp in range(splits)]
        assert stats[0][:, 0, 0].tolist() == expected
        assert all(int(t.count_nonzero()) == 0 for t in TICKETS.values())


@pytest.mark.parametrize("window", [None, 24])
def test_live_ranges_match_a_brute_force_mask(window):
    """live_kv_ranges against the mask itself: [lo, hi) covers every block with a kept pair, and the
    blocks of [full_lo, full_hi) keep every pair (what lets the kernel drop the mask there)."""
    from edgeslm.kernels.softcap_attention import live_kv_ranges

    start, t, group, bm, bn = 37, 90, 2, 32, 8
    k_pos = torch.cat((ring_positions(start, 16), torch.arange(start, start + t, device=DEVICE)))
    q_pos = torch.arange(start, start + t, device=DEVICE)
    rows = t * group
    n_m = -(-rows // bm)
    ranges = live_kv_ranges(q_pos, k_pos, group, bm, bn, n_m, window).tolist()
    qp = q_pos.repeat_interleave(group)
    keep = (k_pos[None, :] >= 0) & (k_pos[None, :] <= qp[:, None])
    if window is not None:
        keep &= qp[:, None] - k_pos[None, :] < window
    saw_full = False
    for m, (lo, f_lo, f_hi, hi) in enumerate(ranges):
        assert lo <= f_lo <= f_hi <= hi
        block = keep[m * bm:(m + 1) * bm]
        for j in range(-(-k_pos.numel() // bn)):
            cols = block[:, j * bn:(j + 1) * bn]
            if cols.any():
                assert lo <= j < hi
            if f_lo <= j < f_hi:
                assert cols.all() and cols.shape[1] == bn
                saw_full = True
    assert saw_full


def test_prefill_long_run_of_whole_blocks():
    """A long causal + window prefill where most blocks are whole: the unmasked loop carries most of
    the work and the result still matches the reference."""
    t, d, window = 160, 32, 70
    k, v, k_pos = global_cache(1, 1, t, d, t, torch.float32)
    q = rand(1, 2, t, d, dtype=torch.float32)
    q_pos = torch.arange(t, device=DEVICE)
    got, want = run_both(q, k, v, q_pos, k_pos, scale=0.3, softcap=2.0, window=window, block_m=32, block_n=16)
    assert_matches(got, want, torch.float32)
