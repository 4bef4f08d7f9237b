"""Compile the Relax decoder for WebGPU and write the artifact files.

  model.wasm              wasm32 host code + VM bytecode + WGSL, linked with the TVM web runtime
  tensor-cache.json       tvmjs weight index; params_shard_*.bin (raw bytes, each <= 128 MB:
                          Android caps one storage-buffer binding at 128 MB, web-llm #209)
  mlc-chat-config.json    model facts in MLC's config shape, plus an "edgeslm" block
  shaders/<kernel>.wgsl   every compute shader, for inspection (verify lists them)
  webgpu.json             what the page needs: function names, cache shape, dtype, features
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgeslm.errors import EdgeSLMError

from .relax_model import RelaxDecoder, export_params

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


def relax_module(decoder, dtype: str, context: int = 512):
    model = RelaxDecoder(decoder.spec, decoder.rope_scaling, quant_of(decoder), dtype, context)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    names = [n for n, _ in named]
    return mod, names, export_params(decoder, names, dtype, context)


def compile_cpu(decoder, dtype: str = "float32", context: int = 512):
    """The same module built for the host CPU (llvm): a fast numeric check without a browser."""
    import tvm
    from tvm import relax

    mod, names, params = relax_module(decoder, dtype, context)
    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm, [tvm.runtime.tensor(params[n]) for n in names]


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


def build_webgpu(decoder, out: Path, dtype: str, model_name: str, context: int, tokenizer=None,
                 progress: bool = True) -> dict:
    import tvm
    from tvm.contrib import tvmjs

    from .runtime import emcc_path, runtime_home, runtime_libs

    emcc_path()
    runtime_libs(progress=progress)
    mod, names, params = relax_module(decoder, dtype, context)
    target = tvm.target.Target("webgpu", host=WASM_HOST)
    ex = _relax_build(mod, target)

    def link(output, objects, options=None):
        saved = os.environ.get("TVM_HOME")
        os.environ["TVM_HOME"] = str(runtime_home())
        try:
            # -O0 at link: the runtime bitcode is already -O3 and the kernels run on the GPU; the
            # -O3 default spends minutes in wasm-opt for no measurable gain here
            tvmjs.create_tvmjs_wasm(output, objects, list(options or []) + ["-O0"])
        finally:
            if saved is None:
                os.environ.pop("TVM_HOME", None)
            else:
                os.environ["TVM_HOME"] = saved

    # wasm object files, not LLVM bitcode: Debian's emscripten (LLVM 14) cannot read TVM's LLVM 22 bitcode
    link.object_format = "o"
    ex.export_library(str(out / "model.wasm"), fcompile=link)

    shader_dir = out / "shaders"
    shader_dir.mkdir()
    shaders = wgsl_sources(ex)
    for name, text in shaders.items():
        (shader_dir / f"{name}.wgsl").write_text(text)

    ordered = [(n, params[n]) for n in names]
    largest = max(a.nbytes for _, a in ordered)
    if largest > SHARD_CAP_MB * 2**20:
        big = max(ordered, key=lambda kv: kv[1].nbytes)[0]
        raise EdgeSLMError(f"tensor {big} is {largest / 2**20:.0f} MB, over the {SHARD_CAP_MB} MB per-buffer cap")
    tvmjs.dump_tensor_cache(ordered, str(out), encode_format="raw", shard_cap_mb=SHARD_CAP_MB,
                            show_progress=False)

    s = decoder.spec
    page = {
        "param_names": names,
        "dtype": dtype,
        "features": ["shader-f16"] if dtype == "float16" else [],
        "cache": {"layers": s.num_layers, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim},
        "vocab_size": s.vocab_size,
        "context_length": context,  # the rope tables' length: positions past it are refused
        "functions": {"first": "forward_first", "step": "forward"},
        "largest_buffer_bytes": int(largest),
    }
    (out / "webgpu.json").write_text(json.dumps(page, indent=2))
    write_chat_config(out, decoder, dtype, model_name, context, tokenizer)
    return {"compute_dtype": dtype, "shaders": len(shaders), "largest_buffer_bytes": int(largest)}


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


def write_chat_config(out: Path, decoder, dtype: str, model_name: str, context: int, tokenizer):
    s = decoder.spec
    hf = getattr(decoder, "hf_config", None)
    quant = quant_of(decoder)
    qname = "q0f32" if quant is None else f"q4{'f16' if dtype == 'float16' else 'f32'}_g{quant['group_size']}"
    cfg = {
        "model_type": s.family,
        "quantization": qname,
        "model_config": hf.to_dict() if hf is not None else {},
        "vocab_size": s.vocab_size,
        "context_window_size": context,
        "sliding_window_size": s.sliding_window or -1,
        "prefill_chunk_size": 0,
        "tensor_parallel_shards": 1,
        "temperature": 0.0,
        "bos_token_id": getattr(hf, "bos_token_id", None),
        "eos_token_id": getattr(hf, "eos_token_id", None),
        "tokenizer_files": [],
        "edgeslm": {
            "source": model_name,
            "compute_dtype": dtype,
            "kv_cache": "tuple of per-layer tensors [2, kv_heads, past, head_dim], grown per call; not MLC's paged cache",
            "attn_softcap": s.attn_softcap,
            "final_softcap": s.final_softcap,
            "layer_is_local": list(s.layer_is_local),
        },
    }
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        cfg["tokenizer_files"] = sorted(p.name for p in out.glob("tokenizer*")) + sorted(
            p.name for p in out.glob("special_tokens_map.json"))
    (out / "mlc-chat-config.json").write_text(json.dumps(cfg, indent=2, default=str))


def numpy_logits(vm, params, tokens: np.ndarray, cache=None):
    """CPU helper: one call of forward/forward_first -> (logits numpy, cache tvm tensor)."""
    import tvm

    tok = tvm.runtime.tensor(tokens.astype("int32").reshape(1, -1))
    if cache is None:
        logits, cache = vm["forward_first"](tok, params)
    else:
        logits, cache = vm["forward"](tok, cache, params)
    return logits.numpy(), cache
