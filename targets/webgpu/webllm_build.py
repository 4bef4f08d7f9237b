"""The WebLLM model library: module construction, the `_metadata` record, and a host-CPU build of
the same module driven the way the engine drives it (for numeric checks without a browser)."""

from __future__ import annotations

import numpy as np

from .relax_model import export_params
from .webllm_model import WebLLMDecoder, attach_metadata

PAGE_SIZE = 16


def model_type(spec) -> str:
    return spec.family


def memory_usage(spec, params: dict, dtype: str, context: int, prefill_chunk: int) -> dict:
    """GPU memory the library needs, in bytes: weights, the paged cache at full context, and an
    upper bound of the activations live in one prefill chunk (f32 logits of every position
    included, as prefill_all_logits returns them)."""
    item = 2 if dtype == "float16" else 4
    pages = (context + PAGE_SIZE - 1) // PAGE_SIZE + 1
    kv = spec.num_layers * pages * 2 * spec.num_kv_heads * PAGE_SIZE * spec.head_dim * item
    width = 4 * spec.hidden_size + 3 * spec.intermediate_size + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * 2
    act = prefill_chunk * (width * item + spec.vocab_size * 4)
    weights = sum(int(a.nbytes) for a in params.values())
    return {"params_bytes": weights, "kv_cache_bytes": kv, "prefill_activation_bytes": act,
            "total_bytes": weights + kv + act}


def webllm_module(decoder, dtype: str, context: int, target, gpu: bool, prefill_chunk: int, quant,
                  metadata_extra: dict | None = None):
    """-> (IRModule with every engine function, param names in order, params by name)."""
    from tvm import relax

    from . import sampling

    model = WebLLMDecoder(decoder.spec, decoder.rope_scaling, quant, dtype, context, target, gpu)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    names = [n for n, _ in named]
    params = export_params(decoder, names, dtype, context)
    bb = relax.BlockBuilder(mod)
    sampling.attach_sampling(bb, gpu, decoder.spec.vocab_size)
    mod = bb.finalize()
    meta = {
        "model_type": model_type(decoder.spec),
        "quantization": quantization_name(quant, dtype),
        "kv_state_kind": "kv_cache",
        "disaggregation": False,
        "context_window_size": context,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": prefill_chunk,
        "max_batch_size": 1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "params": [{"name": n, "shape": list(params[n].shape), "dtype": str(params[n].dtype), "preprocs": []}
                   for n in names],
        "memory_usage": memory_usage(decoder.spec, params, dtype, context, prefill_chunk),
    }
    meta.update(metadata_extra or {})
    mod = attach_metadata(mod, meta)
    return mod, names, params, meta


def packed_quant(decoder):
    """build.quant_of for a model with packed int4 weights; None for a float model."""
    if not any(name.endswith("qweight") for name, _ in decoder.named_buffers()) and \
            not any(name.endswith("qweight") for name, _ in decoder.named_parameters()):
        return None
    from .build import quant_of

    return quant_of(decoder)


class CPUEngine:
    """The library built for llvm and driven through the same runtime calls as WebLLM's engine:
    create the paged cache, add sequence 0, then begin_forward / prefill|decode / end_forward."""

    def __init__(self, decoder, dtype: str = "float32", context: int = 128, prefill_chunk: int = 64):
        import tvm
        from tvm import relax

        target = tvm.target.Target("llvm")
        mod, names, params, self.metadata = webllm_module(decoder, dtype, context, target, False, prefill_chunk,
                                                          packed_quant(decoder))
        ex = tvm.compile(mod, target)
        self.vm = relax.VirtualMachine(ex, tvm.cpu())
        self.params = [tvm.runtime.tensor(params[n]) for n in names]
        self.context, self.chunk = context, prefill_chunk
        f = tvm.get_global_func
        self.begin, self.end = f("vm.builtin.kv_state_begin_forward"), f("vm.builtin.kv_state_end_forward")
        self.add_seq, self.clear = f("vm.builtin.kv_state_add_sequence"), f("vm.builtin.kv_state_clear")
        self.shape = tvm.runtime.ShapeTuple
        self.cache = self.vm["create_tir_paged_kv_cache"](self.shape([1]), self.shape([context]),
                                                          self.shape([prefill_chunk]), self.shape([PAGE_SIZE]),
                                                          self.shape([0]))
        self.reset()

    def reset(self):
        self.clear(self.cache)
        self.add_seq(self.cache, 0)

    def _run(self, fn: str, tokens) -> np.ndarray:
        import tvm

        ids = tvm.runtime.tensor(np.asarray(tokens, dtype="int32"))
        emb = self.vm["embed"](ids, self.params)
        emb = emb.numpy().reshape(1, len(tokens), -1)
        self.begin(self.cache, self.shape([0]), self.shape([len(tokens)]))
        out = self.vm[fn](tvm.runtime.tensor(emb), self.cache, self.params)
        self.end(self.cache)
        return out[0].numpy()

    def prefill_all(self, tokens) -> np.ndarray:
        """Logits [T, V] for every position, fed in chunks of at most prefill_chunk tokens."""
        rows = []
        for i in range(0, len(tokens), self.chunk):
            rows.append(self._run("prefill_all_logits", tokens[i:i + self.chunk])[0])
        return np.concatenate(rows)

    def greedy(self, prompt, steps: int) -> tuple[list[int], np.ndarray]:
        """The engine's loop: prefill in chunks (last logits), then one decode per token."""
        self.reset()
        for i in range(0, len(prompt), self.chunk):
            part = prompt[i:i + self.chunk]
            logits = self._run("prefill" if len(part) > 1 else "decode", part)
        out, rows = [], []
        for s in range(steps):
            row = logits.reshape(-1)
            rows.append(row)
            out.append(int(row.argmax()))
            if s + 1 < steps:
                logits = self._run("decode", [out[-1]])
        return out, np.stack(rows)


def link_wasm(ex, path):
    """Links the compiled module with the TVM web runtime (runtime.py) into one wasm file."""
    import os

    from tvm.contrib import tvmjs

    from .runtime import runtime_home

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
    ex.export_library(str(path), fcompile=link)


def largest_binding(spec, params: dict, dtype: str, context: int, prefill_chunk: int) -> dict:
    """The largest storage buffer one kernel binds, by kind: a weight, the cache's pages of one
    layer, or an activation of a full prefill chunk (logits of every position are the largest)."""
    item = 2 if dtype == "float16" else 4
    pages = (context + PAGE_SIZE - 1) // PAGE_SIZE + 1
    sizes = {
        "weight": max(int(a.nbytes) for a in params.values()),
        "kv_pages_per_layer": pages * 2 * spec.num_kv_heads * PAGE_SIZE * spec.head_dim * item,
        "logits_of_a_chunk": prefill_chunk * spec.vocab_size * 4,
        "mlp_of_a_chunk": prefill_chunk * spec.intermediate_size * item,
    }
    return {"bytes": max(sizes.values()), "by_kind": sizes}


def build_webllm(decoder, out, dtype: str, context: int, prefill_chunk: int, quant, progress: bool = True) -> dict:
    """Compiles the library for WebGPU (wasm32 host), links it, writes the tensor cache.
    -> facts: metadata, param names, largest binding, shader texts."""
    import tvm
    from tvm.contrib import tvmjs

    from .build import SHARD_CAP_MB, WASM_HOST, _relax_build, wgsl_sources
    from .runtime import emcc_path, runtime_libs

    emcc_path()
    runtime_libs(progress=progress)
    target = tvm.target.Target("webgpu", host=WASM_HOST)
    mod, names, params, meta = webllm_module(decoder, dtype, context, target, True, prefill_chunk, quant)
    ex = _relax_build(mod, target)
    link_wasm(ex, out / "model.wasm")
    shaders = wgsl_sources(ex)
    ordered = [(n, params[n]) for n in names]
    binding = largest_binding(decoder.spec, params, dtype, context, prefill_chunk)
    if binding["bytes"] > SHARD_CAP_MB * 2**20:
        from edgeslm.errors import EdgeSLMError

        kind = max(binding["by_kind"], key=binding["by_kind"].get)
        raise EdgeSLMError(f"the largest storage buffer ({kind}) is {binding['bytes'] / 2**20:.0f} MB, over the "
                           f"{SHARD_CAP_MB} MB Android Chrome allows per binding")
    tvmjs.dump_tensor_cache(ordered, str(out), encode_format="raw", shard_cap_mb=SHARD_CAP_MB, show_progress=False)
    return {"metadata": meta, "param_names": names, "largest_binding": binding, "shaders": shaders}


def quantization_name(quant, dtype: str) -> str:
    """MLC's own name only where the bytes are that scheme's: unquantized weights in the compute
    dtype are q0f32 / q0f16. edgeslm's int4 layout (uint32 words of 8 nibbles, per-group scales and
    optional zero points, as relax_model.py documents) is not MLC's q4f*_1, so it says what it is."""
    short = "f16" if dtype == "float16" else "f32"
    if quant is None:
        return f"q0{short}"
    zero = "" if quant["symmetric"] else "a"
    return f"edgeslm-q4g{quant['group_size']}{zero}-{short}"


def _postproc_method(folder) -> str:
    """How the engine maps token strings back to bytes (used by its JSON-grammar mode)."""
    import json as _json

    path = folder / "tokenizer.json"
    if not path.is_file():
        return "raw"
    decoder = (_json.loads(path.read_text()).get("decoder") or {})
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) if isinstance(d, dict)}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds:
        return "byte_fallback"
    return "raw"


def conversation_template(tokenizer, eos) -> dict:
    """ChatML when the tokenizer has its markers (SmolLM2-Instruct), else plain turns; the engine's
    completion and token APIs use neither."""
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        end = vocab["<|im_end|>"]
        return {
            "name": "chatml", "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
            "system_message": "You are a helpful assistant.",
            "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
            "messages": [], "seps": ["<|im_end|>\n"], "role_content_sep": "\n", "role_empty_sep": "\n",
            "stop_str": ["<|im_end|>"], "stop_token_ids": sorted(set(eos_ids + [end])),
            "system_prefix_token_ids": None, "add_role_after_system_message": True,
        }
    return {
        "name": "plain", "system_template": "{system_message}", "system_message": "",
        "roles": {"user": "user", "assistant": "assistant"},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
        "messages": [], "seps": ["\n"], "role_content_sep": ": ", "role_empty_sep": ":",
        "stop_str": [], "stop_token_ids": eos_ids, "system_prefix_token_ids": None,
        "add_role_after_system_message": True,
    }


def write_webllm_config(out, decoder, dtype: str, model_name: str, context: int, prefill_chunk: int, tokenizer,
                        quant) -> dict:
    """mlc-chat-config.json in the shape WebLLM reads (tokenizer files next to it)."""
    import json as _json

    s = decoder.spec
    hf = getattr(decoder, "hf_config", None)
    gen = {}
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    files = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                         "added_tokens.json", "special_tokens_map.json") if (out / n).is_file()]
    bos = getattr(hf, "bos_token_id", None)
    eos = getattr(hf, "eos_token_id", None)
    cfg = {
        "version": "0.1.0",
        "model_type": model_type(s),
        "quantization": quantization_name(quant, dtype),
        "model_config": hf.to_dict() if hf is not None else {},
        "vocab_size": s.vocab_size,
        "context_window_size": context,
        "sliding_window_size": -1,  # Gemma's local layers are windowed inside the kernels, per layer
        "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": 1,
        "temperature": float(gen.get("temperature", 1.0)),
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "pad_token_id": getattr(hf, "pad_token_id", None) or 0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tokenizer_files": files,
        "tokenizer_info": {"token_postproc_method": _postproc_method(out), "prepend_space_in_encode": False,
                           "strip_space_in_decode": False},
        "conv_template": conversation_template(tokenizer, eos),
        "edgeslm": {
            "source": model_name,
            "compute_dtype": dtype,
            "kv_cache": "TVM's paged KV cache (page 16); attention kernels with the soft-cap and per-layer windows",
            "attn_softcap": s.attn_softcap,
            "final_softcap": s.final_softcap,
            "sliding_window": s.sliding_window,
            "layer_is_local": list(s.layer_is_local),
        },
    }
    (out / "mlc-chat-config.json").write_text(_json.dumps(cfg, indent=2, default=str))
    return cfg


WEBLLM_VERSION = "0.2.85"


def check_webllm_runtime():
    """Refuses (exit 2) a WebLLM whose bundled web runtime is not the TVM wheel's: the model library
    links the wheel's C++ runtime, and the engine's JavaScript half must speak the same ABI.
    -> facts for the manifest."""
    import json as _json
    from importlib import metadata

    from edgeslm.errors import EdgeSLMError

    from .browser import node_dir

    pkg = node_dir() / "node_modules" / "@mlc-ai" / "web-llm" / "package.json"
    if not pkg.is_file():
        raise EdgeSLMError(f"@mlc-ai/web-llm is not installed in {node_dir()}; run scripts/setup.sh "
                           f"(npm install @mlc-ai/web-llm@{WEBLLM_VERSION})")
    info = _json.loads(pkg.read_text())
    version = info.get("version", "?")
    declared = {**info.get("devDependencies", {}), **info.get("dependencies", {})}.get("@mlc-ai/web-runtime", "")
    runtime = declared.lstrip("^~=")
    tvm_version = metadata.version("apache-tvm")
    wheel_minor = ".".join(tvm_version.split(".")[:2])
    runtime_minor = ".".join(runtime.split(".")[:2])
    if version != WEBLLM_VERSION or runtime_minor != wheel_minor:
        raise EdgeSLMError(
            f"@mlc-ai/web-llm {version} bundles web-runtime {runtime or 'of unknown version'}, but the model "
            f"library links the TVM {tvm_version} runtime ({wheel_minor}); install @mlc-ai/web-llm@{WEBLLM_VERSION} "
            f"(bundles web-runtime ^0.27.0-dev0), e.g. with scripts/setup.sh")
    return {"webllm_version": version, "web_runtime": runtime, "tvm": tvm_version}


def export_webllm(decoder, out, dtype: str, model_name: str, context: int, prefill_chunk: int, tokenizer=None,
                  progress: bool = True) -> dict:
    """The whole artifact folder:

      model.wasm            the model library (wasm32 host code + WGSL + the TVM web runtime)
      tensor-cache.json     tvmjs / WebLLM weight index; params_shard_*.bin (each <= 128 MB)
      mlc-chat-config.json  the engine's config; tokenizer files next to it
      shaders/<kernel>.wgsl every compute shader, for inspection
      webgpu.json           what edgeslm's pages need: names, dtype, features, the largest binding
    """
    import json as _json
    from pathlib import Path

    out = Path(out)
    versions = check_webllm_runtime()
    quant = packed_quant(decoder)
    prefill_chunk = max(1, min(prefill_chunk, context))
    facts = build_webllm(decoder, out, dtype, context, prefill_chunk, quant, progress=progress)
    shader_dir = out / "shaders"
    shader_dir.mkdir(exist_ok=True)
    for name, text in facts["shaders"].items():
        (shader_dir / f"{name}.wgsl").write_text(text)
    write_webllm_config(out, decoder, dtype, model_name, context, prefill_chunk, tokenizer, quant)
    s = decoder.spec
    binding = facts["largest_binding"]
    page = {
        "param_names": facts["param_names"],
        "dtype": dtype,
        "features": ["shader-f16"] if dtype == "float16" else [],
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "context_length": context,  # the rope tables' length and the cache's capacity
        "prefill_chunk_size": prefill_chunk,
        "page_size": PAGE_SIZE,
        "functions": {"embed": "embed", "prefill_all": "prefill_all_logits", "decode": "decode",
                      "create_cache": "create_tir_paged_kv_cache"},
        "largest_buffer_bytes": int(binding["bytes"]),
        **versions,
    }
    (out / "webgpu.json").write_text(_json.dumps(page, indent=2))
    return {"compute_dtype": dtype, "shaders": len(facts["shaders"]), "largest_buffer_bytes": int(binding["bytes"]),
            "largest_binding_by_kind": binding["by_kind"], "prefill_chunk_size": prefill_chunk,
            "quantization": quantization_name(quant, dtype), **versions}
