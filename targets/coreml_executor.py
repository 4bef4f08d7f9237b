"""A Core ML reference executor for Linux: runs a saved .mlpackage's MIL program with numpy.

This is NOT Apple's Core ML runtime (which exists only on macOS/iOS; coremltools' predict() raises
on Linux). It exists so that `edgeslm verify` can run the very program we ship:

 - the program is read back from the saved package with coremltools' own milproto loader, so the
   ops, their attributes and the weight file are exactly what a device would load;
 - constexpr weights (constexpr_blockwise_shift_scale, constexpr_lut_to_dense, ...) are
   decompressed with coremltools' own `materialized_val_inference`, once per function;
 - every op runs through the numpy `value_inference` that coremltools' ops carry (what its
   constant folding uses): we hand the op its input values and call that method;
 - read_state / coreml_update_state are handled here (coremltools folds no state);
 - linear and matmul are computed here, in fp32 with the result cast to the op's output dtype:
   numpy has no fast fp16 matmul (coremltools' value inference would take minutes per token on
   SmolLM2), and Apple's GPU/ANE also accumulate fp16 products in fp32. Tests check these against
   coremltools' value inference.

Hand-written because no library runs MIL on Linux (coremltools has no interpreter; its constant
folding only covers ops whose inputs are all constant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

RUNTIME = "edgeslm MIL executor (numpy, coremltools {ver} op semantics) - NOT Apple's Core ML runtime"


def runtime_string() -> str:
    import coremltools

    return RUNTIME.format(ver=coremltools.__version__)


def load_program(package: Path):
    """The MIL program of a saved .mlpackage (all of its functions), via coremltools' loader."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{package} is not an ML Program")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, str(weights)), spec


def _box(var, value):
    """Gives `var` a compile-time value, which is what coremltools' value_inference reads."""
    holder = var.sym_type()
    holder.val = value
    var._sym_val = holder


def _as_dtype(value, var):
    from coremltools.converters.mil.mil import types

    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        want = types.nptype_from_builtin(var.dtype)
        if isinstance(value, np.ndarray):
            return value.astype(want, copy=False) if value.dtype != want else value
        return np.array(value, dtype=want) if types.is_tensor(var.sym_type) else want(value)
    return value


# The fp32 products go through torch.matmul on numpy buffers: the same arithmetic as np.matmul,
# 2-5x faster on this CPU (batched matmuls especially).
def _f32(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _linear(op, env):
    wt = env.get(_FP32_T + op.weight.name)  # prepared once per package (see Function)
    wt = torch.from_numpy(wt) if wt is not None else _f32(env[op.weight.name]).T
    y = torch.matmul(_f32(env[op.x.name]), wt)
    if op.bias is not None:
        y += _f32(env[op.bias.name])
    return y.numpy()


def _matmul(op, env):
    x, y = _f32(env[op.x.name]), _f32(env[op.y.name])
    if op.transpose_x.val:
        x = x.transpose(-1, -2)
    if op.transpose_y.val:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y).numpy()


def _silu(op, env):
    # coremltools implements no value inference for silu; x * sigmoid(x), in fp32
    x = env[op.x.name].astype(np.float32)
    return x / (1.0 + np.exp(-x))


_FP32_T = "\0fp32T:"  # env key prefix of a linear weight kept as fp32 [K, N]

# ops computed here rather than by coremltools' value inference (see the module docstring)
OWN_OPS = {"linear": _linear, "matmul": _matmul, "silu": _silu}
STATE_OPS = ("read_state", "coreml_update_state")


class Function:
    """One function of the program, its weights decompressed, ready to run."""

    def __init__(self, name, func, shared: dict | None = None):
        self.name, self.func = name, func
        shared = {} if shared is None else shared
        self.inputs = dict(func.inputs)
        self.states = {n: v for n, v in func.inputs.items() if _is_state(v)}
        self.ops = list(func.operations)
        self.constants = {}
        for op in self.ops:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                self.constants[op.outputs[0].name] = _constant_value(op)
        # fp32 transposed copies of constant linear weights (numpy's fp16 matmul is very slow);
        # shared between functions, whose deduplicated weights carry the same names
        for op in self.ops:
            if op.op_type == "linear" and op.weight.name in self.constants:
                key = _FP32_T + op.weight.name
                if key not in shared:
                    shared[key] = np.ascontiguousarray(self.constants[op.weight.name].astype(np.float32).T)
                self.constants[key] = shared[key]
        self.outputs = [v.name for v in func.outputs]

    def run(self, feeds: dict, states: dict) -> dict:
        """feeds: input name -> array; states: state name -> array, updated in place."""
        env = dict(self.constants)
        for name, var in self.inputs.items():
            if name in self.states:
                continue
            if name not in feeds:
                raise KeyError(f"function {self.name}: missing input {name!r}")
            env[name] = _as_dtype(np.asarray(feeds[name]), var)
        for op in self.ops:
            if op.outputs and op.outputs[0].name in env and (op.op_type == "const" or op.op_type.startswith("constexpr_")):
                continue
            results = run_op(op, env, states)
            for var, val in zip(op.outputs, results):
                env[var.name] = val
        return {n: env[n] for n in self.outputs}


def _is_state(var):
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _constant_value(op):
    if op.op_type == "const":
        var = op.outputs[0]
        if isinstance(var.val, np.bool_):  # the proto loader yields numpy bools; numpy 2 rejects them as flags
            var._sym_val.val = bool(var.val)
        return var.val
    return op.materialized_val_inference()


def run_op(op, env: dict, states: dict | None = None) -> tuple:
    """Runs one op on the values in env (var name -> numpy value). Returns its output values."""
    if op.op_type == "read_state":
        return (states[op.input.name].copy(),)
    if op.op_type == "coreml_update_state":
        value = env[op.value.name]
        states[op.state.name][...] = value
        return (value,)
    if op.op_type in OWN_OPS:
        out = OWN_OPS[op.op_type](op, env)
        return (_as_dtype(out, op.outputs[0]),)
    boxed = []
    try:
        for var in op.get_flattened_inputs():
            if var.val is None:  # a runtime value; compile-time constants already carry theirs
                if var.name not in env:
                    raise KeyError(f"op {op.name}: input {var.name} has no value")
                saved = var._sym_val
                _box(var, env[var.name])
                boxed.append((var, saved))
        result = op.value_inference()
    finally:
        for var, saved in boxed:
            var._sym_val = saved
    if result is None:
        raise NotImplementedError(f"coremltools has no value inference for {op.op_type} ({op.name})")
    if len(op.outputs) == 1:
        result = (result,)
    return tuple(_as_dtype(np.asarray(r) if not np.isscalar(r) else r, v) for r, v in zip(result, op.outputs))


class MILExecutor:
    """A saved .mlpackage, loaded for running with numpy. One state set shared by all functions."""

    def __init__(self, package: Path):
        from coremltools.converters.mil.mil import types

        self.program, self.spec = load_program(package)
        shared = {}
        self.functions = {name: Function(name, f, shared) for name, f in self.program.functions.items()}
        first = next(iter(self.functions.values()))
        self.state_shapes = {
            n: (tuple(v.sym_type.wrapped_type().get_shape()), types.nptype_from_builtin(v.sym_type.wrapped_type().get_primitive()))
            for n, v in first.states.items()
        }
        self.states = {}
        self.reset()

    @property
    def runtime(self) -> str:
        return runtime_string()

    def reset(self):
        self.states = {n: np.zeros(shape, dtype) for n, (shape, dtype) in self.state_shapes.items()}

    def run(self, function: str, feeds: dict) -> dict:
        return self.functions[function].run(feeds, self.states)
