"""kernels/int4_matmul.py: the Triton dequant-matmul and its dX backward against the reference.

Fresh random codes, scales, zero points and activations every run; outputs poisoned with NaN
before each launch; K steps that do not divide K (K is always a multiple of the group).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
from edgeslm.kernels.int4_matmul import (  # noqa: E402
    dequantize_int4,
    int4_matmul,
    int4_matmul_reference,
    pack_int4,
    unpack_int4,
)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# relative to the largest output: accumulation order differs, and the output is rounded to dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_weight(n, k, group, asymmetric):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(n, k // group, device=DEVICE) * 0.04 + 0.005).half()
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device=DEVICE) if asymmetric else None
    return pack_int4(codes), scales, zeros


def assert_close(got, want, dtype):
    assert not torch.isnan(got).any(), "kernel left poisoned (unwritten) outputs"
    err = (got.float() - want.float()).abs().max().item()
    bound = REL_TOL[dtype] * want.float().abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def run_forward(x, qweight, scales, zeros, group, **config):
    out = torch.full((*x.shape[:-1], qweight.shape[0]), float("nan"), dtype=x.dtype, device=DEVICE)
    got = int4_matmul(x, qweight, scales, zeros, group, out=out, **config)
    assert got.data_ptr() == out.data_ptr()
    return got


# (M, N, K, group, config): M 1..16 takes the GEMV/split-K path, larger M the GEMM path.
CASES = [
    (1, 72, 320, 64, dict(block_k=128, split_k=2)),  # K = 2.5 BLOCK_K, split-K partials summed
    (5, 41, 256, 32, dict(block_n=16, block_k=64, split_k=3)),  # N not a multiple of BLOCK_N
    (16, 64, 384, 128, dict(block_k=256)),  # K = 1.5 BLOCK_K, group 128
    (37, 48, 224, 32, dict(block_m=16, block_n=32, block_k=128)),  # GEMM, every edge ragged
    (70, 96, 256, 64, dict()),  # launcher's own heuristics
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-G{c[3]}" for c in CASES])
def test_matches_reference(dtype, asymmetric, case):
    m, n, k, group, config = case
    qweight, scales, zeros = random_weight(n, k, group, asymmetric)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    got = run_forward(x, qweight, scales, zeros, group, **config)
    assert_close(got, int4_matmul_reference(x, qweight, scales, zeros, group), dtype)


def test_batched_and_strided_input():
    """[B, T, K] activations, and a non-contiguous view (the decoder hands over transposed views)."""
    qweight, scales, zeros = random_weight(40, 128, 32, True)
    x = torch.randn(3, 128, 7, device=DEVICE).transpose(1, 2)  # [3, 7, 128], not contiguous
    got = run_forward(x, qweight, scales, zeros, 32)
    assert got.shape == (3, 7, 40)
    assert_close(got, int4_matmul_reference(x, qweight, scales, zeros, 32), torch.float32)


def test_nibble_order_and_zero_point_are_the_documented_layout():
    """Low nibble = even k, symmetric zero = 8: the same codes read with the nibbles swapped, or
    with zero 0, give a clearly different product, so a kernel that misreads the layout fails."""
    n, k, group = 32, 128, 32
    qweight, scales, _ = random_weight(n, k, group, False)
    x = torch.randn(4, k, device=DEVICE)
    got = run_forward(x, qweight, scales, None, group)
    want = int4_matmul_reference(x, qweight, scales, None, group)
    assert_close(got, want, torch.float32)
    swapped = (qweight >> 4) | (qweight << 4)
    for wrong in (int4_matmul_reference(x, swapped, scales, None, group),
                  int4_matmul_reference(x, qweight, scales, torch.zeros_like(scales, dtype=torch.uint8), group)):
        assert (got - wrong).abs().max() > 0.1 * want.abs().max()
    # and the reference itself is the layout: nibble j of byte i is code 2i + j
    codes = unpack_int4(qweight)
    assert torch.equal(codes[:, 0::2], qweight & 0xF) and torch.equal(codes[:, 1::2], qweight >> 4)
    w = dequantize_int4(qweight, scales, None, group)
    assert torch.allclose(w, (codes.float() - 8) * scales.float().repeat_interleave(group, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 40])
def test_backward_gives_dx(dtype, m):
    """QLoRA: the gradient reaches the activations (and through them the adapters); the frozen
    int4 base gets none."""
    n, k, group = 72, 192, 64
    qweight, scales, zeros = random_weight(n, k, group, True)
    x = torch.randn(m, k, device=DEVICE).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = int4_matmul(x, qweight, scales, zeros, group)
    y_ref = int4_matmul_reference(x_ref, qweight, scales, zeros, group)
    assert_close(y.detach(), y_ref.detach(), dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x.grad, x_ref.grad, dtype)
    assert qweight.grad is None and scales.grad is None


def test_lora_over_int4_base_trains():
    """A LoRA adapter on top of the kernel's int4 base: a few SGD steps lower the loss exactly as
    they do over the reference (same gradients reach the adapter)."""
    n, k, group, r = 32, 128, 32, 4
    qweight, scales, _ = random_weight(n, k, group, False)
    x, target = torch.randn(24, k, device=DEVICE), torch.randn(24, n, device=DEVICE)
    losses = {}
    for name, fn in (("kernel", int4_matmul), ("reference", int4_matmul_reference)):
        torch.manual_seed(1)
        a = (torch.randn(r, k, device=DEVICE) * 0.05).requires_grad_()
        b = torch.zeros(n, r, device=DEVICE, requires_grad=True)
        opt = torch.optim.SGD([a, b], lr=0.05)
        run = []
        for _ in range(3):
            h = x.detach().requires_grad_()  # x needs grad: the base takes the autograd Function
            y = fn(h, qweight, scales, None, group) + (h @ a.T) @ b.T
            loss = torch.nn.functional.mse_loss(y, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[name] = run
    assert losses["kernel"][-1] < losses["kernel"][0]
    assert losses["kernel"] == pytest.approx(losses["reference"], rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_split_k_in_one_launch_rearms_its_tickets(dtype, m):
    """Split-K sums its parts in the tile's last program (an atomic ticket), not in extra kernels:
    three calls in a row stay right, and every ticket is back at zero after each."""
    from edgeslm.kernels._tickets import TICKETS

    n, k, group = 48, 512, 32
    for call in range(3):
        qweight, scales, zeros = random_weight(n, k, group, asymmetric=call == 1)
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        got = run_forward(x, qweight, scales, zeros, group, block_k=64, split_k=4, block_n=16)
        assert_close(got, int4_matmul_reference(x, qweight, scales, zeros, group), dtype)
        assert all(int(t.count_nonzero()) == 0 for t in TICKETS.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_reads_codes_at_every_nibble_position(dtype):
    """M = 1 reads each of the 8 nibbles of a word through its own mask / magic number (and, for
    16-bit activations, its own shift): one-hot activations pick single codes out of the product."""
    n, k, group = 16, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEVICE)
    scales = torch.full((n, k // group), 0.5, dtype=torch.float16, device=DEVICE)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device=DEVICE)
    x = torch.eye(k, device=DEVICE).to(dtype)
    got = torch.stack([run_forward(x[i : i + 1], pack_int4(codes), scales, zeros, group)[0] for i in range(8)])
    want = (codes[:, :8].float() - zeros[:, :1].float()).T * 0.5
    assert torch.equal(got.float(), want)
