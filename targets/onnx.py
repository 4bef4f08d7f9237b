"""ONNX target: an onnxruntime-genai model folder, run by onnxruntime-genai's Generator.

  model.onnx           one decoder graph (targets/onnx_graph.py) in genai's I/O contract
  model.onnx.data      every initializer once (ONNX external data, 64-byte aligned)
  genai_config.json    genai's config: I/O names, heads, context, past_present_share_buffer
  tokenizer files      at the folder's top, where genai's Tokenizer looks for them

`og.Model(folder)` then `og.Generator` runs it as it is. The graph keeps our packed int4 codes
byte for byte (MatMulNBits / GatherBlockQuantized) and uses GroupQueryAttention over one KV buffer
shared by past and present. MatMulNBits' accuracy_level is recorded in the manifest: 0 computes in
float from the exact int4 weights (parity bounds: max |logit diff| <= 1e-3, greedy tokens
identical), 4 (the default for quantized schemes) quantizes activations to int8 per block, as genai's
builder ships it, with bounds derived at export from that arithmetic simulated on the reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeSLMError
from .base import ExportContext, Runner, Target

MODEL = "model.onnx"
WEIGHTS = "model.onnx.data"
CONFIG = "genai_config.json"

# The level a plain export of a quantized scheme writes: 4, the faster one for a prompt and its
# answer. The quiet A/B in benchmarks/RESULTS.md (SmolLM2 q4g32-gptq, genai's Generator, 2 threads,
# 128 + 128 tokens) has level 4 decoding 1.49x faster than level 0 and prefilling 0.72x as fast: the
# whole request takes 0.75x the time. Its bounds are derived from its arithmetic (derived_bounds);
# --accuracy-level 0 (ExportContext.options["accuracy_level"]) writes the exact graph.
DEFAULT_ACCURACY_LEVEL = 4

EXACT_BOUNDS = {"max_abs_logit": 1e-3, "tokens_identical": True, "free_running_identical": True,
                "free_running_min_prefix": None, "ppl_rel": 0.01,
                "basis": "MatMulNBits accuracy_level 0 dequantizes our codes exactly and accumulates in fp32; "
                        "every other op is fp32, so only summation order differs from the reference"}
# accuracy_level 4 rounds each 32-value block of activations to int8 before the int4 x int8 dot products.
ACCURACY_BOUNDS = {
    0: EXACT_BOUNDS,
    4: {"max_abs_logit": 4.0, "tokens_identical": False, "free_running_identical": False,
        "free_running_min_prefix": None, "ppl_rel": 0.01,
        "basis": "MatMulNBits accuracy_level 4 (int8 activations per block) is not exact: measured on "
                 "SmolLM2-135M q4g32-rtn, 64 teacher-forced steps, max |logit diff| 2.81 (mean 0.27), greedy "
                 "64/64 and free-running 64/64 identical, Brown perplexity +0.82% vs the int4 reference; "
                 "0.56 on tests/tiny.py's llama. Bound: 4.0 on the logits, perplexity within 1%"},
}


def bounds_for(spec, level: int) -> dict:
    """The bounds verify applies to an artifact of this spec at this accuracy level."""
    bounds = dict(ACCURACY_BOUNDS[level])
    if spec.final_softcap is not None and bounds["free_running_identical"]:
        # a final soft-cap saturates logits at +-cap: the reference's own top-2 margins reach 0 (exact
        # fp32 ties, e.g. 8 of 64 steps on tests/tiny.py's Gemma 2), and at a tie the argmax of any
        # other summation order may take the other token, after which the free-running paths differ
        bounds["free_running_identical"] = False
        bounds["basis"] += ("; free-running identity not bound: the final soft-cap makes exact ties in the "
                            "reference's logits (teacher-forced tokens and logits stay bound)")
    return bounds


def _ort_model_bytes(proto, folder: Path) -> dict:
    """Moves every initializer above 1 KiB into model.onnx.data (64-byte aligned, so onnxruntime can
    map the tensors in place) and saves model.onnx."""
    import onnx
    from onnx import external_data_helper

    stored = 0
    with open(folder / WEIGHTS, "wb") as f:
        for init in proto.graph.initializer:
            if len(init.raw_data) < 1024:
                continue
            pad = (-stored) % 64
            f.write(b"\0" * pad)
            stored += pad
            data = init.raw_data
            f.write(data)
            external_data_helper.set_external_data(init, WEIGHTS, offset=stored, length=len(data))
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            stored += len(data)
    onnx.save_model(proto, str(folder / MODEL), save_as_external_data=False)
    return {"weights_bytes": stored}


def genai_config(model, ctx: ExportContext, level: int) -> dict:
    """genai's config for this graph (the keys genai's own builder writes for a GQA decoder)."""
    from .onnx_graph import IO

    s, hf = model.spec, model.hf_config
    tok = ctx.tokenizer

    def token_id(name):
        """The model config's id, else the tokenizer's; only ids inside the vocabulary (genai checks)."""
        for source in (hf, tok):
            value = getattr(source, name, None) if source is not None else None
            values = [v for v in (value if isinstance(value, list) else [value]) if v is not None and 0 <= v < s.vocab_size]
            if values:
                return values if isinstance(value, list) else values[0]
        return None

    eos = token_id("eos_token_id")
    pad = token_id("pad_token_id")
    config = {
        "model": {
            "context_length": ctx.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL,
                "head_size": s.head_dim,
                "hidden_size": s.hidden_size,
                "inputs": {"input_ids": IO["input_ids"], "attention_mask": IO["attention_mask"],
                           "past_key_names": IO["past_key"], "past_value_names": IO["past_value"]},
                "outputs": {"logits": IO["logits"], "present_key_names": IO["present_key"],
                            "present_value_names": IO["present_value"]},
                "num_attention_heads": s.num_heads,
                "num_hidden_layers": s.num_layers,
                "num_key_value_heads": s.num_kv_heads,
            },
            "type": "decoder",
            "vocab_size": s.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    # genai reads a number (or a list for eos) or nothing: a model without one (tiny Qwen 2) leaves it out
    for key, value in (("bos_token_id", token_id("bos_token_id")), ("eos_token_id", eos),
                       ("pad_token_id", pad if pad is not None else (eos[0] if isinstance(eos, list) else eos))):
        if value is not None:
            config["model"][key] = value
    return config


class OnnxTarget(Target):
    name = "onnx"
    description = ("onnxruntime-genai model folder (model.onnx + genai_config.json): GroupQueryAttention, "
                   "MatMulNBits over our int4 codes, GatherBlockQuantized")
    artifact_suffix = MODEL

    def unavailable_reason(self):
        for mod, pkg in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxruntime_genai", "onnxruntime-genai")):
            try:
                __import__(mod)
            except ImportError:
                return f"{pkg} is not installed (pip install -r requirements.txt)"
        return None

    def unsupported_reason(self, model, scheme):
        fam = model.spec.family
        reason = scheme.target_reason("onnx")
        if reason:
            return f"onnx: {fam}: {reason}"
        if not scheme.quantized and scheme.float_dtype != "float32":
            return f"onnx: {fam} with {scheme.name}: the graph is fp32 (onnxruntime's CPU kernels lack many fp16 ops)"
        s = model.spec
        if s.rotary_dim % 2:
            return f"onnx: {fam}: rotary_dim {s.rotary_dim} is odd; GroupQueryAttention/RotaryEmbedding cannot express it"
        return None

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        from .onnx_graph import OPSET, build_decoder_graph

        level = int(ctx.options.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)) if scheme.quantized else 0
        if level not in ACCURACY_BOUNDS:
            raise EdgeSLMError(f"onnx: accuracy_level {level} is not one of {sorted(ACCURACY_BOUNDS)}")
        proto, facts = build_decoder_graph(model.eval(), ctx.context_length, level)
        # no onnx.checker: SimplifiedLayerNormalization lives in onnxruntime's build of the default
        # domain (as genai's builder writes it), which the checker does not know; loading is the check
        written = _ort_model_bytes(proto, out)
        (out / CONFIG).write_text(json.dumps(genai_config(model, ctx, level), indent=2))
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(str(out))
        bounds = bounds_for(model.spec, level) if level == 0 else self.derived_bounds(model, scheme, ctx, level)
        return {"graph": MODEL, "weights": WEIGHTS, "genai_config": CONFIG, "opset": OPSET,
                "accuracy_level": level, "parity_bounds": bounds,
                "runtime_contract": "onnxruntime-genai", **facts, **written}

    def derived_bounds(self, model, scheme, ctx: ExportContext, level: int) -> dict:
        """Above level 0, MatMulNBits rounds each block of activations (the weights' block size) to
        symmetric int8 with an fp32 scale before the integer dot products: bounds from that
        arithmetic simulated on the reference (parity.derive_bounds)."""
        from edgeslm.parity import derive_bounds
        from edgeslm.simulate import q8_0, simulated

        block = scheme.group_size or 32

        def simulate(reference):
            return simulated(reference, activations=lambda x: q8_0(x, block, fp16_scale=False))

        basis = f"MatMulNBits accuracy_level {level}: int8 activations per block of {block} (fp32 scale)"
        return derive_bounds(model, simulate, ctx.tokenizer, ctx.context_length, basis, ppl_rel=0.01,
                             reference_key=ctx.reference or None)

    def load(self, folder: Path, manifest: dict) -> Runner:
        return GenaiRunner(Path(folder), manifest)

    def parity_bounds(self, scheme) -> dict:
        """The bounds at accuracy_level 0 (f32 and int4 both exact); an artifact exported at another
        level carries its own bounds in manifest["parity_bounds"]."""
        return dict(EXACT_BOUNDS)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        return {"accuracy_level": manifest.get("accuracy_level"), "fused_ops": manifest.get("fused_ops"),
                "attention_fallbacks": len(manifest.get("attention_fallbacks") or {}),
                "runtime_contract": manifest.get("runtime_contract")}


def with_accuracy_level(src: Path, out: Path, level: int) -> dict:
    """A copy of an exported folder whose MatMulNBits compute at `level`: the same weights file and
    config, only the nodes' accuracy_level attribute and the manifest (level, bounds, hashes) change.
    The copy is unverified (manifest parity None) until `edgeslm verify` runs on it."""
    import shutil

    import onnx

    from ..artifact import atomic_folder, read_manifest, write_manifest
    from ..loading import read_hf_config
    from ..config import spec_from_hf_config

    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if manifest.get("target") != "onnx":
        raise EdgeSLMError(f"{src} is not an onnx artifact")
    if level not in ACCURACY_BOUNDS:
        raise EdgeSLMError(f"onnx: accuracy_level {level} is not one of {sorted(ACCURACY_BOUNDS)}")
    with atomic_folder(out, force=True) as tmp:
        for f in src.iterdir():
            if f.name not in (MODEL, "manifest.json"):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        proto = onnx.load(str(src / MODEL), load_external_data=False)
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                for a in node.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
        onnx.save_model(proto, str(tmp / MODEL), save_as_external_data=False)
        spec = spec_from_hf_config(read_hf_config(Path(manifest["reference"])))
        fields = {k: v for k, v in manifest.items() if k not in ("format", "created", "tools", "files")}
        fields.update(accuracy_level=level, parity_bounds=bounds_for(spec, level), parity=None)
        return write_manifest(tmp, fields)


def _session_overlay(threads: int | None) -> str | None:
    if not threads:
        return None
    return json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads),
                                                                 "inter_op_num_threads": 1}}}})


class GenaiRunner(Runner):
    """The artifact in onnxruntime-genai: og.Model(folder) and one og.Generator per sequence.

    Generator keeps the KV cache and positions itself, so prefill/decode must continue the sequence
    it holds (start == the tokens it has seen); reset starts a new Generator. Logits come from the
    graph's `logits` output: the last position of the last append_tokens call (the graph is pruned),
    so scoring a window feeds it one token per call."""

    score_chunk = 1

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        threads = threads or (int(os.environ["EDGESLM_THREADS"]) if os.environ.get("EDGESLM_THREADS") else None)
        try:
            config = og.Config(str(folder))
            overlay = _session_overlay(threads)
            if overlay:
                config.overlay(overlay)
            self.model = og.Model(config)
        except Exception as e:  # a damaged folder must read as one line
            raise EdgeSLMError(f"onnxruntime-genai cannot load {folder}: {str(e).splitlines()[0]}") from None
        self.context = int(manifest["context_length"])
        level = manifest.get("accuracy_level")
        self.runtime = f"onnxruntime-genai {og.__version__} (Generator, MatMulNBits accuracy_level {level})"
        self.gen = None
        self.reset()

    def reset(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.seen = 0

    def _append(self, ids: np.ndarray) -> np.ndarray:
        if self.seen + ids.shape[1] > self.context:
            raise EdgeSLMError(f"{self.seen + ids.shape[1]} tokens exceed the artifact's context ({self.context})")
        self.gen.append_tokens(ids.astype(np.int32))
        self.seen += ids.shape[1]
        return np.asarray(self.gen.get_output("logits"), dtype=np.float32)

    def _at(self, start: int):
        if start != self.seen:
            raise EdgeSLMError(f"onnxruntime-genai continues its own sequence: position {start} asked, "
                               f"{self.seen} tokens seen")

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        self._at(start)
        return torch.from_numpy(self._append(tokens.numpy()).reshape(1, -1, self.model_vocab()))

    def decode(self, token: int, pos: int) -> torch.Tensor:
        self._at(pos)
        return torch.from_numpy(self._append(np.array([[token]])).reshape(-1)[-self.model_vocab():].copy())

    def model_vocab(self) -> int:
        return int(self.gen.get_output("logits").shape[-1])

    def close(self):
        self.gen = None
        self.model = None


class OrtRunner(Runner):
    """The same model.onnx in a plain onnxruntime session: the second check (tests compare it with
    the Generator path), and the one path that can feed GroupQueryAttention a past shorter than the
    buffer (past and present not shared), which shows the graph does not rely on genai's buffer."""

    score_chunk = 1  # the graph's logits are the last position's

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(Path(folder) / MODEL), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EdgeSLMError(f"onnxruntime cannot load {folder}: {str(e).splitlines()[0]}") from None
        self.runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.reset()

    def reset(self):
        self.cache = {n: np.zeros((1, self.shapes[n][1], 0, self.shapes[n][3]), np.float32) for n in self.past_names}
        self.seen = 0

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if start != self.seen:
            raise EdgeSLMError(f"position {start} asked, {self.seen} tokens seen")
        t = tokens.shape[1]
        feeds = {"input_ids": tokens.numpy().astype(np.int64),
                 "attention_mask": np.ones((1, self.seen + t), np.int64), **self.cache}
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        self.cache = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        self.seen += t
        return torch.from_numpy(out[0])

    def decode(self, token: int, pos: int) -> torch.Tensor:
        return self.prefill(torch.tensor([[token]]), pos)[0, -1]


TARGET = OnnxTarget()
