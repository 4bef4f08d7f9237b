"""The WebGPU target: a model library for WebLLM's engine, built with apache-tvm, run in real
headless Chromium.

  relax_model.py        the layers as a tvm.relax.frontend.nn module (int4 packed weights, f32/f16)
  webllm_model.py       the engine's functions over them: embed, prefill, decode, the paged KV cache
  softcap_attention.py  the cache's attention kernels, with the soft-cap and per-layer windows
  sampling.py           the sampling functions the engine calls on every token
  webllm_build.py       compile, link, tensor cache, mlc-chat-config.json, the WebLLM version check
  build.py              the WebGPU compile pipeline and WGSL listing (and the older tvmjs-only module)
  runtime.py            the TVM web runtime bitcode, built once from the wheels' sources (own headers)
  browser.py            the runners: 127.0.0.1 static server + node/playwright-core + Chromium, with
                        the tvmjs page (logits, for verify) or WebLLM's engine (CreateMLCEngine)
  page/                 the two pages and the node driver
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..base import ExportContext, Runner, Target

DTYPES = {"float32": "float32", "f32": "float32", "float16": "float16", "f16": "float16"}


class WebGPUTarget(Target):
    name = "webgpu"
    description = "TVM Relax -> WGSL + wasm model library for @mlc-ai/web-llm, run in headless Chromium"
    artifact_suffix = "model.wasm"

    def unavailable_reason(self):
        try:
            import tvm  # noqa: F401
        except ImportError:
            return "apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)"
        if shutil.which("emcc") is None:
            return "emscripten (emcc) is not installed: apt-get install -y emscripten (or run scripts/setup.sh)"
        from .browser import missing_parts

        return missing_parts()

    def unsupported_reason(self, model, scheme):
        return scheme.target_reason("webgpu")

    def compute_dtype(self, scheme, ctx: ExportContext | None) -> str:
        from edgeslm.errors import EdgeSLMError

        asked = (ctx.options.get("compute_dtype") if ctx is not None else None) or (
            "float16" if not scheme.quantized and scheme.float_dtype == "float16" else "float32")
        if asked not in DTYPES:
            raise EdgeSLMError(f"webgpu compute dtype must be float32 or float16, not {asked!r}")
        return DTYPES[asked]

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        from .webllm_build import check_webllm_runtime, export_webllm

        check_webllm_runtime()  # a mismatched WebLLM is refused before minutes of compiling
        dtype = self.compute_dtype(scheme, ctx)
        facts = export_webllm(model.float().eval() if dtype == "float32" else model.eval(), Path(out), dtype,
                              ctx.model_name, ctx.context_length, ctx.prefill_chunk, tokenizer=ctx.tokenizer)
        return {"webgpu": facts, "compute_dtype": dtype}

    def load(self, folder: Path, manifest: dict) -> Runner:
        from .browser import BrowserRunner

        return BrowserRunner(Path(folder))

    def load_for_run(self, folder: Path, manifest: dict) -> Runner:
        """`edgeslm run` generates through WebLLM's own engine (CreateMLCEngine); verify keeps the
        tvmjs page, which returns logits."""
        from .browser import WebLLMRunner

        return WebLLMRunner(Path(folder))

    def parity_bounds(self, scheme) -> dict:
        # f32 compute on the GPU reorders sums (tiled reductions), so allow 1e-3 on logits as the
        # issue states; an f16 artifact is a different arithmetic and is only reported.
        if not scheme.quantized and scheme.float_dtype == "float16":
            return {"max_abs_logit": None, "tokens_identical": False, "ppl_rel": 0.02}
        return {"max_abs_logit": 1e-3, "tokens_identical": True, "ppl_rel": 0.01}

    def inspect(self, folder: Path, manifest: dict) -> dict:
        folder = Path(folder)
        shaders = {p.name: p.stat().st_size for p in sorted((folder / "shaders").glob("*.wgsl"))}
        shards = {p.name: p.stat().st_size for p in sorted(folder.glob("params_shard_*.bin"))}
        return {
            "wasm_bytes": (folder / "model.wasm").stat().st_size if (folder / "model.wasm").is_file() else None,
            "shaders": shaders,
            "shader_bytes": sum(shaders.values()),
            "shards": shards,
            "compute_dtype": manifest.get("compute_dtype"),
        }


TARGET = WebGPUTarget()
