"""The WebGPU compile pipeline and its helpers (webllm_build.py writes the artifact):

  quant_of       the int4 settings the Relax layers map (None for float weights)
  gpu_pipeline   TVM's generic GPU lowering with dlight's Fallback schedule
  wgsl_sources   every compute shader of a built module, by kernel name

SHARD_CAP_MB: tensor-cache shards and every storage-buffer binding stay within 128 MB, the most
Android Chrome allows one binding.
"""

from __future__ import annotations

from edgeslm.errors import EdgeSLMError

SHARD_CAP_MB = 128
WASM_HOST = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}


def quant_of(decoder) -> dict | None:
    """int4 settings shared by every quantized module; None for a float model."""
    from edgeslm.schemes.base import QuantizedLinear

    mods = [m for m in decoder.modules() if isinstance(m, QuantizedLinear)]
    if not mods:
        return None
    if any(not hasattr(m, "group_size") for m in mods):  # unsupported_reason refuses such schemes first
        raise EdgeSLMError("the webgpu target maps int4 and float weights only")
    groups = {m.group_size for m in mods}
    sym = {m.zeros is None for m in mods}
    if len(groups) != 1 or len(sym) != 1:
        raise EdgeSLMError("the webgpu target needs one int4 group size and one zero-point mode for all weights")
    return {"group_size": groups.pop(), "symmetric": sym.pop()}


def wgsl_sources(ex) -> dict[str, str]:
    """kernel name -> WGSL, from the WebGPU module imported by the host module."""
    shaders = {}
    for m in _walk(ex.mod):
        if m.kind == "webgpu":
            src = m.inspect_source("wgsl")
            # One text for all kernels; kernels start at their `@compute` attribute.
            for chunk in _split_kernels(src):
                shaders[chunk[0]] = chunk[1]
    return shaders


def _walk(mod):
    yield mod
    for sub in mod.imports:
        yield from _walk(sub)


def _split_kernels(src: str):
    """TVM's WGSL text marks each kernel with a `// Function: <name>` header line."""
    import re

    marks = list(re.finditer(r"^// Function: (\w+)\s*$", src, flags=re.M))
    if not marks:
        return [("all", src)]
    ends = [m.start() for m in marks[1:]] + [len(src)]
    return [(m.group(1), src[m.start():end]) for m, end in zip(marks, ends)]


def gpu_pipeline(target):
    """TVM's generic GPU pipeline with dlight's Fallback rule only (one thread per output element,
    serial reduction). Measured here: the Matmul rule's tiled schedule for matmuls with two dynamic
    sides (attention over past + new tokens) emits ~0.5 MB WGSL kernels that SwiftShader needed
    over 8 GB to compile; the Reduction rules spend a 64-thread workgroup on every output of
    K=16..64 reductions, which on a CPU adapter made a 128-token prefill of the tiny model take
    30-50 s. Tuned schedules for real GPUs are future work (MLC's own dlight rules + static shapes)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend import gpu_generic
    from tvm.s_tir import dlight as dl

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(gpu_generic.library_dispatch_passes(target) + legalize
                                           + gpu_generic.dataflow_lower_passes(target)
                                           + gpu_generic.finalize_passes(target))
            return seq(mod)

    return pipeline


def _relax_build(mod, target):
    from tvm import relax

    return relax.build(mod, target, relax_pipeline=gpu_pipeline(target), system_lib=True)
