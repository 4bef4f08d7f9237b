"""The numpy MIL executor (targets/coreml_executor.py) against coremltools itself.

Per op: a one-op MIL program whose inputs are runtime placeholders is run by the executor, and the
same op built on constant inputs is evaluated by coremltools' own value inference (what its
constant folding uses); shapes and dtypes must equal coremltools' type inference. The ops the
executor computes itself (linear, matmul in fp32; silu, which coremltools cannot evaluate) are
checked the same way or against torch. End to end, a converted fp32 decoder without cache must
match the PyTorch decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from edgeslm.targets.coreml_executor import OWN_OPS, MILExecutor, run_op, runtime_string  # noqa: E402

RNG = np.random.default_rng(0)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def f16(*shape):
    return RNG.standard_normal(shape).astype(np.float16)


# op type -> (runtime inputs, static attributes). Covers every op our Core ML exports contain
# (test_target_coreml checks that the inventory stays inside this table).
CASES = {
    "add": ({"x": f16(2, 3, 4), "y": f16(1, 3, 4)}, {}),
    "sub": ({"x": f32(2, 3), "y": f32(2, 3)}, {}),
    "mul": ({"x": f16(2, 3, 4), "y": f16(4)}, {}),
    "real_div": ({"x": f32(5), "y": f32(5) + 3}, {}),
    "pow": ({"x": f16(3, 4)}, {"y": np.float16(2.0)}),
    "rsqrt": ({"x": np.abs(f16(3, 4)) + np.float16(0.5)}, {}),
    "tanh": ({"x": f16(3, 4)}, {}),
    "cos": ({"x": f32(7)}, {}),
    "sin": ({"x": f32(7)}, {}),
    "softmax": ({"x": f16(2, 3, 9)}, {"axis": -1}),
    "gelu": ({"x": f16(3, 8)}, {"mode": "TANH_APPROXIMATION"}),
    "reduce_mean": ({"x": f16(2, 3, 8)}, {"axes": [-1], "keep_dims": True}),
    "reshape": ({"x": f16(2, 3, 4)}, {"shape": [1, 6, 4]}),
    "transpose": ({"x": f16(2, 3, 4)}, {"perm": [0, 2, 1]}),
    "concat": ({"values": (f16(1, 2, 3), f16(1, 4, 3))}, {"axis": 1}),
    "expand_dims": ({"x": f32(3, 4)}, {"axes": [0]}),
    "tile": ({"x": f32(2, 3)}, {"reps": [3, 1]}),
    "slice_by_index": ({"x": f16(1, 2, 8, 4)}, {"begin": np.array([0, 0, 3, 0], np.int32),
                                                "end": np.array([1, 2, 5, 4], np.int32)}),
    "slice_update": ({"x": f16(1, 2, 8, 4), "update": f16(1, 2, 2, 4), "begin": np.array([0, 0, 5, 0], np.int32),
                      "end": np.array([1, 2, 7, 4], np.int32)}, {}),
    "select": ({"cond": RNG.random((3, 4)) > 0.5, "a": f16(3, 4), "b": f16(3, 4)}, {}),
    "greater_equal": ({"x": np.arange(6, dtype=np.int32), "y": np.int32(3)}, {}),
    "less": ({"x": np.arange(6, dtype=np.int32), "y": np.int32(3)}, {}),
    "less_equal": ({"x": np.arange(6, dtype=np.int32), "y": np.int32(3)}, {}),
    "logical_and": ({"x": RNG.random(6) > 0.5, "y": RNG.random(6) > 0.5}, {}),
    "logical_not": ({"x": RNG.random(6) > 0.5}, {}),
    "floor_div": ({"x": np.arange(-6, 6, dtype=np.int32), "y": np.int32(4)}, {}),
    "mod": ({"x": np.arange(-6, 6, dtype=np.int32), "y": np.int32(4)}, {}),
    "cast": ({"x": f32(3, 4)}, {"dtype": "fp16"}),
    "gather": ({"x": f16(10, 4), "indices": np.array([[3, 0, 9]], np.int32)}, {"axis": 0}),
    "linear": ({"x": f16(1, 5, 8)}, {"weight": f16(6, 8), "bias": f16(6)}),  # weights are compile-time consts
    "matmul": ({"x": f16(1, 2, 5, 8), "y": f16(1, 2, 6, 8)}, {"transpose_y": True}),
    "silu": ({"x": f16(3, 8)}, {}),
}


def _spec(value):
    value = np.asarray(value)
    return mb.TensorSpec(shape=value.shape or (1,), dtype=types.numpy_type_to_builtin_type(value.dtype))


def _build(op_type, runtime, static):
    """-> (the op built on placeholders, its feeds, the output var of the same op on constants)."""
    flat = []
    for name, v in runtime.items():
        if isinstance(v, tuple):
            flat += [(f"{name}_{i}", x) for i, x in enumerate(v)]
        else:
            flat.append((name, v))
    scalar_inputs = {n for n, v in flat if np.ndim(v) == 0}
    holder = {}

    from coremltools.converters.mil.mil import Function

    placeholders = {n: _spec(v) for n, v in flat}
    with Function(placeholders, opset_version=ct.target.iOS18) as func:
        named = dict(func.inputs)
        # scalars travel as [1] placeholders; squeeze them back so shapes match the constant build
        for n in scalar_inputs:
            named[n] = mb.squeeze(x=named[n])
        kwargs = {}
        for name, v in runtime.items():
            kwargs[name] = tuple(named[f"{name}_{i}"] for i in range(len(v))) if isinstance(v, tuple) else named[name]
        out = getattr(mb, op_type)(**kwargs, **static)
        holder["const"] = getattr(mb, op_type)(**runtime, **static) if op_type not in OWN_OPS else None
        func.set_outputs([out])

    target = [op for op in func.operations if op.op_type == op_type][0]
    feeds = {}
    for (n, v), var in zip(flat, func.inputs.values()):
        feeds[var.name] = np.asarray(v).reshape(-1) if n in scalar_inputs else np.asarray(v)
    env = dict(feeds)
    env.update({v.name: v.val for v in target.inputs.values() if not isinstance(v, (list, tuple)) and v.val is not None})
    for op in func.operations:  # the squeezes of scalar placeholders
        if op is target:
            break
        if op.op_type != "const":
            env.update(zip([o.name for o in op.outputs], run_op(op, env)))
    return target, env, holder["const"]


@pytest.mark.parametrize("op_type", sorted(CASES))
def test_op_matches_coremltools(op_type):
    runtime, static = CASES[op_type]
    op, env, const_out = _build(op_type, runtime, static)
    (got,) = run_op(op, env, {})
    out = op.outputs[0]
    # type inference: shape and dtype as coremltools infers them for this op
    assert tuple(np.shape(got)) == tuple(out.shape)
    assert np.asarray(got).dtype == types.nptype_from_builtin(out.dtype)
    if op_type == "silu":  # coremltools has no value inference for silu
        want = torch.nn.functional.silu(torch.from_numpy(runtime["x"].astype(np.float32))).numpy()
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
        return
    if op_type in OWN_OPS:  # ours run in fp32; coremltools' value inference computes the same function
        from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry  # noqa: F401

        saved = {}
        for name, var in op.inputs.items():
            if var.val is None:
                saved[name] = var._sym_val
                holder = var.sym_type()
                holder.val = env[var.name]
                var._sym_val = holder
        try:
            want = op.value_inference()
        finally:
            for name, s in saved.items():
                op.inputs[name]._sym_val = s
        np.testing.assert_allclose(got.astype(np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
        return
    want = const_out.val
    assert want is not None, f"coremltools produced no value for {op_type}"
    if np.asarray(want).dtype.kind == "f":
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-3, atol=1e-3)
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_blockwise_int4_decompression_matches_our_layout():
    """constexpr_blockwise_shift_scale as the executor materializes it == our int4 dequantization."""
    from edgeslm.kernels.int4_matmul import dequantize_int4, pack_int4

    codes = torch.from_numpy(RNG.integers(0, 16, (6, 64)).astype(np.uint8))
    scales = torch.from_numpy((RNG.random((6, 2)) * 0.1 + 0.01).astype(np.float16))
    zeros = torch.from_numpy(RNG.integers(0, 16, (6, 2)).astype(np.uint8))
    want = dequantize_int4(pack_int4(codes), scales, zeros, 32, torch.float32).numpy()

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.constexpr_blockwise_shift_scale(data=codes.numpy().astype(types.np_uint4_dtype), scale=scales.numpy(),
                                               offset=zeros.numpy().astype(types.np_uint4_dtype))
        return mb.linear(x=x, weight=w)

    op = [o for o in prog.functions["main"].operations if o.op_type.startswith("constexpr_")][0]
    got = op.materialized_val_inference()
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float16).astype(np.float32), rtol=0, atol=0)


def test_fp32_decoder_without_cache_matches_torch(tmp_path):
    """A whole tiny Gemma 2 decoder (soft-caps, window 8), converted in fp32 without states: the
    executor reproduces the PyTorch logits to fp32 rounding."""
    from tiny import tiny_pair

    from edgeslm.ops import reference_only

    _, dec = tiny_pair("gemma2")

    class Logits(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, tokens):
            return self.d(tokens.long())[0]

    ids = torch.randint(0, dec.spec.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with reference_only(), torch.no_grad():
        want = dec(ids)[0].numpy()
        traced = torch.jit.trace(Logits(dec).eval(), ids.int())
    ml = ct.convert(traced, inputs=[ct.TensorType(name="tokens", shape=(1, 20), dtype=np.int32)],
                    outputs=[ct.TensorType(name="logits", dtype=np.float32)], convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32,
                    skip_model_load=True)
    path = tmp_path / "m.mlpackage"
    ml.save(str(path))
    ex = MILExecutor(path)
    got = ex.run("main", {"tokens": ids.int().numpy()})["logits"]
    assert ex.runtime == runtime_string()
    assert "NOT Apple's Core ML runtime" in ex.runtime
    err = np.abs(got - want).max()
    print("fp32 executor vs torch: max |logit diff|", err)
    assert err < 1e-5, err  # logits lie in (-0.2, 0.2): the final soft-cap
    top2 = np.sort(want, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * err  # near-ties are common under a 0.2 soft-cap
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
