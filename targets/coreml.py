"""Core ML target: one .mlpackage (ML Program, iOS 18 / macOS 15) with the KV cache as Core ML state.

The package holds two functions sharing one deduplicated weight file:
  prefill(tokens int32 [1, chunk], start int32 [1]) -> logits fp32 [1, chunk, V]
  decode (tokens int32 [1, 1],     start int32 [1]) -> logits fp32 [1, 1, V]
Both read and write the states kv0, kv1, ... (fp16 [1, Hkv, L, D], the Decoder's cache layout:
L = context for global layers, L = window for sliding-window layers, used as a ring).

How it is built, and why:
 - We trace `CoreMLStep`: the reference Decoder itself, with the cache as registered buffers and,
   in every layer's KV seam, StateKVAttention, whose writes use the ops the Core ML converter maps
   to states: a slice assignment with a traced start (slice_update + write_state) for global
   layers and decode-time ring writes, and one gather + select over the ring for prefill.
   Masks are built in the graph from positions (transformers' mask builders trip the converter).
   tests/test_target_coreml.py checks that the wrapper computes the Decoder's exact function.
 - Quantized schemes are traced with float weights dequantized from OUR packed codes, converted,
   and then every weight const of a quantized module is replaced by constexpr_blockwise_shift_scale
   holding those same codes and fp16 scales (int4 per block, or int8 per channel): a re-packing, not
   a re-quantization. A quantized module that keeps a float weight is an export error.
 - `palettize4` (option, float schemes only) is coremltools' own 4-bit k-means palettization of the
   float weights, restricted to linear/gather ops so constant masks and RoPE tables stay exact.
 - prefill and decode are converted separately and merged with ct.utils.save_multifunction, which
   deduplicates identical weights.

Running: on macOS, MLModel.predict with a state (not testable on this Linux machine); elsewhere the
numpy MIL executor in coreml_executor.py, which says plainly that it is not Apple's runtime.
"""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeslm.errors import EdgeSLMError

from .base import ExportContext, Runner, Target

PACKAGE = "model.mlpackage"
SPEC_IOS18 = 9  # Core ML specification version of iOS 18 / macOS 15
QUANTIZED_WEIGHT_OPS = ("linear", "gather", "matmul")  # where model weights are consumed


# ---------------------------------------------------------------- the traced wrapper


class StateKVAttention(nn.Module):
    """The decoder's KVAttention (model.py) with its cache writes in the form the converter maps to
    Core ML state updates: slice assignments with a traced start (slice_update + write_state) for
    global layers and decode-time ring writes, one gather + select over the ring for a prefill
    chunk. The cache is fp16 (Core ML state); attention runs in the compute dtype."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, q_pos, start, kc, vc, inplace: bool):
        from edgeslm.model import ring_positions
        from edgeslm.ops import attention

        a, t, slots = self.inner, q.shape[2], kc.shape[2]
        if a.is_local and t > 1:  # attend over (old ring ++ new keys) before writing, as KVAttention does
            keys = torch.cat((kc.to(k.dtype), k), dim=2)
            values = torch.cat((vc.to(v.dtype), v), dim=2)
            k_pos = torch.cat((ring_positions(start, slots), q_pos))
            _write_ring_chunk(kc, k, start, slots)
            _write_ring_chunk(vc, v, start, slots)
        else:
            if a.is_local:
                slot = torch.remainder(start, slots)  # t == 1
                kc[:, :, slot : slot + 1] = k.to(kc.dtype)
                vc[:, :, slot : slot + 1] = v.to(vc.dtype)
                k_pos = ring_positions(start + t, slots)
            else:
                kc[:, :, start : start + t] = k.to(kc.dtype)
                vc[:, :, start : start + t] = v.to(vc.dtype)
                idx = torch.arange(slots)
                k_pos = torch.where(idx < start + t, idx, -1)
            keys, values = kc.to(k.dtype), vc.to(v.dtype)
        out = attention(q, keys, values, q_pos, k_pos, scale=a.spec.attn_scale, softcap=a.spec.attn_softcap,
                        window=a.window)
        return out, kc, vc


class CoreMLStep(nn.Module):
    """The Decoder itself (model.py) for a fixed chunk of `t` tokens, with its cache as registered
    buffers (the Core ML states) and StateKVAttention in every layer's KV seam. It takes `decoder`
    over: its KV seams are replaced in place (export hands it a float copy)."""

    def __init__(self, decoder, context_length: int, cache_dtype=torch.float16):
        super().__init__()
        self.dec = decoder.swap_kv_attention(lambda i, kv: StateKVAttention(kv))
        for i, buf in enumerate(decoder.new_cache(1, context_length, dtype=cache_dtype)):
            self.register_buffer(f"kv{i}", buf)

    def reset(self):
        for i in range(2 * len(self.dec.layers)):
            getattr(self, f"kv{i}").zero_()

    def forward(self, tokens, start):
        cache = [getattr(self, f"kv{i}") for i in range(2 * len(self.dec.layers))]
        logits, _ = self.dec(tokens.long(), start.reshape(()).long(), cache)
        return logits


def _write_ring_chunk(cache, new, start, slots: int):
    """Ring write of a chunk, as model.write_ring: slot s takes the last new token j with
    (start + j) % slots == s. One gather + select over the whole ring (a chunk may wrap)."""
    t = new.shape[2]
    base = t - min(t, slots)
    j = base + torch.remainder(torch.arange(slots) - start - base, slots)
    written = (j < t).view(1, 1, slots, 1)
    picked = new.index_select(2, torch.where(j < t, j, t - 1)).to(cache.dtype)
    cache[:, :, 0:slots] = torch.where(written, picked, cache)


# ---------------------------------------------------------------- quantized weights


def float_shadow(model):
    """A float copy of `model` whose quantized modules became float ones holding the dequantized
    weights (exact in fp32), plus name -> quantized module, for re-packing after conversion."""
    from edgeslm.model import Embedding, Linear
    from edgeslm.schemes.base import QuantizedEmbedding, QuantizedLinear

    shadow = copy.deepcopy(model).float()
    quantized = {}
    for name, m in list(shadow.named_modules()):
        if isinstance(m, QuantizedEmbedding):
            new = Embedding(m.out_features, m.in_features)
        elif isinstance(m, QuantizedLinear):
            new = Linear(m.in_features, m.out_features, m.bias is not None)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().float())
        else:
            continue
        new.weight = nn.Parameter(m.dequantized(torch.float32))
        quantized[name] = m
        parent = shadow.get_submodule(name.rpartition(".")[0]) if "." in name else shadow
        setattr(parent, name.rpartition(".")[2], new)
    return shadow.eval(), quantized


def _packed_weight(m):
    """A quantized module -> (data, scale, offset) for constexpr_blockwise_shift_scale, from the
    scheme's own codes (its shift_scale hook); 4-bit codes and offsets in coremltools' uint4."""
    from coremltools.converters.mil.mil import types

    w = m.shift_scale()
    if not w.uint4:
        return w.data, w.scale, w.offset
    offset = None if w.offset is None else w.offset.astype(types.np_uint4_dtype)
    return w.data.astype(types.np_uint4_dtype), w.scale, offset


def _repack_pass(quantized: dict):
    """A coremltools graph pass that swaps each quantized module's weight const for our codes."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    wanted = {"dec_" + name.replace(".", "_") + "_weight": m for name, m in quantized.items()}

    class RepackOurWeights(AbstractGraphPass):
        def apply(self, prog):
            self.done = set()
            for func in prog.functions.values():
                with func:
                    for op in list(func.operations):
                        if op.op_type != "const":
                            continue
                        key = op.outputs[0].name.removesuffix("_to_fp16")
                        if key not in wanted:
                            continue
                        m = wanted[key]
                        ref = m.dequantized(torch.float32).numpy().astype(types.nptype_from_builtin(op.outputs[0].dtype))
                        if op.outputs[0].shape != ref.shape or not np.array_equal(op.outputs[0].val, ref):
                            raise EdgeSLMError(f"Core ML export: weight {key} does not match the packed module")
                        data, scale, offset = _packed_weight(m)
                        new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale.astype(ref.dtype), offset=offset,
                                                                 before_op=op, name=op.name + "_q")
                        op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                                        new_var=new, force_replace=True)
                        op.enclosing_block.remove_ops([op])
                        self.done.add(key)

    return RepackOurWeights(), wanted


# ---------------------------------------------------------------- conversion


# The Decoder computes RMS statistics in fp32 (x.float()); so does the package: SmolLM2's residual
# stream reaches ~22,500, whose square overflows fp16 (65,504) and would zero the norm.
FP32_OPS = ("pow", "reduce_mean", "rsqrt", "reduce_sum_square", "sqrt")


def keep_in_fp16(op) -> bool:
    """op_selector for FP16ComputePrecision: False keeps an op in fp32 (norm statistics)."""
    if op.op_type in FP32_OPS:
        return False
    if op.op_type in ("add", "real_div"):  # mean(x^2) + eps
        return not any(v.op is not None and v.op.op_type in FP32_OPS for v in op.inputs.values() if hasattr(v, "op"))
    return True


def convert_step(step: CoreMLStep, t: int, precision: str):
    """Traces `step` for chunks of t tokens and converts it to an iOS 18 ML Program."""
    import coremltools as ct

    tokens = torch.zeros(1, t, dtype=torch.int32)
    start = torch.zeros(1, dtype=torch.int32)
    step.reset()
    with torch.no_grad():
        traced = torch.jit.trace(step, (tokens, start), check_trace=False)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(b.shape), dtype=np.float16), name=n)
              for n, b in step.named_buffers() if n.startswith("kv")]
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="tokens", shape=(1, t), dtype=np.int32),
                ct.TensorType(name="start", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)],
        states=states,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.transform.FP16ComputePrecision(op_selector=keep_in_fp16) if precision == "float16"
        else ct.precision.FLOAT32,
        skip_model_load=True,
    )


def palettize4(mlmodel):
    """coremltools' 4-bit k-means palettization, per op type only (a global config would also
    palettize constant masks and tables)."""
    import coremltools as ct

    cfg = ct.optimize.coreml.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=2048)
    config = ct.optimize.coreml.OptimizationConfig(op_type_configs={op: cfg for op in QUANTIZED_WEIGHT_OPS})
    return ct.optimize.coreml.palettize_weights(mlmodel, config)


def repack(mlmodel, quantized: dict):
    from coremltools.models.utils import _apply_graph_pass

    graph_pass, wanted = _repack_pass(quantized)
    out = _apply_graph_pass(mlmodel, graph_pass, spec_version=SPEC_IOS18, skip_model_load=True)
    missing = sorted(set(wanted) - graph_pass.done)
    if missing:
        raise EdgeSLMError(f"Core ML export: no weight const found for quantized modules {missing[:3]}")
    return out


# ---------------------------------------------------------------- inspection


def inspect_package(package: Path) -> dict:
    """Op inventory, states, functions, compressed weight dtypes, size, deployment target; and the
    linear/gather/matmul ops that still read a float weight const (a failure for quantized models)."""
    from collections import Counter

    from coremltools.converters.mil.mil import types

    from .coreml_executor import load_program

    prog, spec = load_program(package)
    functions, ops, compressed, float_weights = {}, Counter(), Counter(), set()
    for fname, func in prog.functions.items():
        counts = Counter(op.op_type for op in func.operations)
        ops.update(counts)
        states = {n: list(v.sym_type.wrapped_type().get_shape()) for n, v in func.inputs.items() if types.is_state(v.sym_type)}
        inputs = {n: list(v.shape) for n, v in func.inputs.items() if not types.is_state(v.sym_type)}
        functions[fname] = {"inputs": inputs, "outputs": [v.name for v in func.outputs], "states": len(states),
                            "ops": sum(counts.values()), "state_update_ops": counts["coreml_update_state"]}
        for op in func.operations:
            if op.op_type.startswith("constexpr_"):
                data = op.inputs.get("data") or op.inputs.get("indices")
                compressed[f"{op.op_type}:{types.builtin_to_string(data.dtype)}"] += 1
            if op.op_type in QUANTIZED_WEIGHT_OPS:
                w = op.inputs.get("weight") if op.op_type == "linear" else op.inputs.get("x") if op.op_type == "gather" else op.inputs.get("y")
                if w is not None and w.op is not None and w.op.op_type == "const" and w.rank >= 2 \
                        and types.is_float(w.dtype) and w.val is not None and w.val.size >= 1024:
                    float_weights.add(w.name)
    version = spec.specificationVersion
    size = sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
    weight_files = sorted(p.relative_to(package).as_posix() for p in Path(package).rglob("*.bin"))
    return {
        "functions": functions,
        "default_function": spec.description.defaultFunctionName or None,
        "states": states,
        "op_inventory": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "compressed_weights": dict(compressed),
        "float_weight_consts": sorted(float_weights),
        "weight_files": weight_files,
        "size_bytes": size,
        "specification_version": version,
        "minimum_deployment_target": "iOS 18 / macOS 15" if version == SPEC_IOS18 else f"spec {version}",
    }


# ---------------------------------------------------------------- runners


class _CoreMLRunnerBase(Runner):
    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.chunk = int(manifest["coreml"]["prefill_chunk"])
        self.context = int(manifest["context_length"])

    def _call(self, function: str, tokens: np.ndarray, start: int) -> np.ndarray:
        raise NotImplementedError

    def _check(self, start: int, t: int):
        if start < 0 or start + t > self.context:
            raise EdgeSLMError(f"positions {start}..{start + t - 1} exceed the package's context ({self.context})")

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        ids = tokens.reshape(-1).numpy().astype(np.int32)
        self._check(start, ids.size)
        out, i = [], 0
        while ids.size - i >= self.chunk:  # whole chunks through prefill
            out.append(self._call("prefill", ids[None, i : i + self.chunk], start + i))
            i += self.chunk
        while i < ids.size:  # the tail token by token: padding a chunk would corrupt the rings
            out.append(self._call("decode", ids[None, i : i + 1], start + i))
            i += 1
        return torch.from_numpy(np.concatenate(out, axis=1).astype(np.float32))

    def decode(self, token: int, pos: int) -> torch.Tensor:
        self._check(pos, 1)
        return torch.from_numpy(self._call("decode", np.array([[token]], np.int32), pos)[0, -1].astype(np.float32))


class CoreMLExecutorRunner(_CoreMLRunnerBase):
    """Linux/anywhere: the numpy MIL executor (NOT Apple's Core ML runtime; says so in `runtime`)."""

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        from .coreml_executor import MILExecutor

        self.executor = MILExecutor(self.folder / PACKAGE)
        self.runtime = self.executor.runtime

    def reset(self):
        self.executor.reset()

    def _call(self, function, tokens, start):
        return self.executor.run(function, {"tokens": tokens, "start": np.array([start], np.int32)})["logits"]


class CoreMLAppleRunner(_CoreMLRunnerBase):
    """macOS 15+: Apple's runtime through MLModel.predict with a state. Written to coremltools'
    documented API but NOT run here (this machine is Linux); verify on a Mac before relying on it."""

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(folder, manifest)
        import coremltools as ct

        path = str(self.folder / PACKAGE)
        self.models = {f: ct.models.MLModel(path, function_name=f) for f in ("prefill", "decode")}
        self.runtime = f"Core ML (macOS {platform.mac_ver()[0]}, coremltools {ct.__version__})"
        self.reset()

    def reset(self):
        self.state = self.models["decode"].make_state()

    def _call(self, function, tokens, start):
        out = self.models[function].predict({"tokens": tokens, "start": np.array([start], np.int32)}, state=self.state)
        return np.asarray(out["logits"])


# ---------------------------------------------------------------- the target


class CoreMLTarget(Target):
    name = "coreml"
    description = "Core ML ML Program (.mlpackage, iOS 18 / macOS 15), KV cache as state, prefill + decode functions"
    artifact_suffix = PACKAGE

    def unavailable_reason(self):
        try:
            import coremltools  # noqa: F401
        except ImportError:
            return "coremltools is not installed (pip install coremltools==9.0)"
        major, minor = (int(x) for x in np.__version__.split(".")[:2])
        if (major, minor) >= (2, 4):
            return f"numpy {np.__version__} breaks the coremltools 9.0 converter; install numpy<2.4"
        return None

    def unsupported_reason(self, model, scheme):
        return scheme.target_reason("coreml")

    def parity_bounds(self, scheme) -> dict:
        """The fallback for a package without derived bounds (see derived_bounds): perplexity only."""
        return {"max_abs_logit": None, "tokens_identical": False, "ppl_rel": 0.02,
                "basis": "a package without derived bounds: perplexity only"}

    def derived_bounds(self, model, scheme, ctx: ExportContext) -> dict:
        """Core ML keeps its KV cache as fp16 state, and computes in fp16 except for f32 packages:
        bounds from that arithmetic simulated on the reference (parity.derive_bounds): the
        reference run in fp16 on the CPU. Core ML's fp16 kernels accumulate in their own order and
        keep some ops in fp32, hence the wider margin there."""
        import functools

        from edgeslm.simulate import simulated
        from edgeslm.parity import derive_bounds

        if scheme.name == "f32":
            simulate = functools.partial(simulated, cache_dtype=torch.float16)
            basis, margin = "Core ML: fp32 compute, fp16 KV-cache state", 2.0
        else:
            simulate = functools.partial(simulated, compute_dtype=torch.float16)
            basis, margin = "Core ML: fp16 compute, fp16 KV-cache state", 4.0
        return derive_bounds(model, simulate, ctx.tokenizer, ctx.context_length, basis, margin=margin,
                             ppl_rel=0.01 if scheme.name == "f32" else 0.02, reference_key=ctx.reference or None)

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        import coremltools as ct
        from tqdm.auto import tqdm

        from edgeslm.ops import reference_only

        compression = ctx.options.get("compression") or ("blockwise" if scheme.quantized else "none")
        if compression == "palettize4" and scheme.quantized:
            raise EdgeSLMError("palettize4 re-clusters float weights; export it from a float scheme (f16)")
        if compression not in ("none", "blockwise", "palettize4"):
            raise EdgeSLMError(f"unknown Core ML compression {compression!r}; known: blockwise, palettize4")
        precision = "float32" if scheme.name == "f32" else "float16"
        chunk = min(ctx.prefill_chunk, ctx.context_length)
        shadow, quantized = float_shadow(model)
        step = CoreMLStep(shadow, ctx.context_length)
        parts = Path(out) / ".parts"
        parts.mkdir(parents=True)
        try:
            with reference_only(), torch.no_grad():
                for fname, t in tqdm([("prefill", chunk), ("decode", 1)], desc="coreml convert", unit="function"):
                    ml = convert_step(step, t, precision)
                    if quantized:
                        ml = repack(ml, quantized)
                    elif compression == "palettize4":
                        ml = palettize4(ml)
                    ml.save(str(parts / f"{fname}.mlpackage"))
            desc = ct.utils.MultiFunctionDescriptor()
            for fname in ("prefill", "decode"):
                desc.add_function(str(parts / f"{fname}.mlpackage"), src_function_name="main", target_function_name=fname)
            desc.default_function_name = "decode"
            ct.utils.save_multifunction(desc, str(Path(out) / PACKAGE))
        finally:
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
        facts = inspect_package(Path(out) / PACKAGE)
        if quantized and facts["float_weight_consts"]:
            raise EdgeSLMError(f"Core ML export left float weights in a quantized package: {facts['float_weight_consts'][:3]}")
        if compression == "palettize4":  # new float weights: no simulation of the reference holds
            bounds = {**self.parity_bounds(scheme), "basis": "palettize4 re-clusters the weights: perplexity only"}
        else:
            bounds = self.derived_bounds(model, scheme, ctx)
        return {"parity_bounds": bounds,
                "coreml": {"prefill_chunk": chunk, "compute_precision": precision, "compression": compression,
                           "functions": list(facts["functions"]), "states": len(facts["states"]),
                           "compressed_weights": facts["compressed_weights"],
                           "minimum_deployment_target": facts["minimum_deployment_target"]}}

    def load(self, folder: Path, manifest: dict) -> Runner:
        if platform.system() == "Darwin" and int(platform.mac_ver()[0].split(".")[0] or 0) >= 15:
            return CoreMLAppleRunner(folder, manifest)
        return CoreMLExecutorRunner(folder, manifest)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        facts = inspect_package(Path(folder) / PACKAGE)
        quantized = manifest.get("scheme") not in ("f32", "f16")
        facts["quantized_float_weight_failure"] = bool(quantized and facts["float_weight_consts"])
        return facts


TARGET = CoreMLTarget()


def describe(folder: Path) -> str:
    """One-screen summary of inspect() for humans."""
    facts = TARGET.inspect(Path(folder), json.loads((Path(folder) / "manifest.json").read_text()))
    return json.dumps(facts, indent=2)
