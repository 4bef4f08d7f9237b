"""GGUF: the model as llama.cpp reads it, written with the `gguf` package from OUR tensors.

Schemes map to GGML types without re-quantizing anything:
  f32 / f16            F32 / F16 weights (norms and biases always F32, as llama.cpp expects)
  q4g{32,64,128}-*     Q4_0. A Q4_0 block is 32 weights: an fp16 scale d and codes q with
                       w = (q - 8) * d, which is exactly our symmetric int4 (zero 8). Our low nibble
                       holds even k; Q4_0 puts element j low and j + 16 high in byte j, so only the
                       nibbles move. A g64/g128 scale is repeated over its 2/4 blocks (exact too).
                       The int4 embedding (and the tied lm_head with it) becomes a Q4_0 token_embd.
  q8c                  Q8_0: a block of 32 int8 codes with one fp16 scale; our per-row scale is
                       repeated over the row's blocks, so the codes and scales carry over exactly.
  q4g*a-* (asymmetric) refused: Q4_1 stores an fp16 min = -zero*scale, which fp16 rounds, so it
                       would not be our weights bit for bit.

Families are data (FAMILIES below): per family, llama.cpp's arch name, which of our modules become
which GGUF tensor (names from the gguf package's MODEL_TENSOR table) and which metadata llama.cpp
reads for it. llama (SmolLM/SmolLM2, Llama 3.x with its rope scaling via rope_freqs), qwen2,
gemma2 (both soft-caps, alternating sliding window), gemma3 (text: q/k norms, per-layer window
pattern, a second RoPE base for local layers), phi3 (gate and up fused into one ffn_up) and stablelm
(LayerNorm with biases, partial rotary, parallel residual). The llama arch in llama.cpp applies RoPE
to interleaved pairs (x0,x1),(x2,x3)... while transformers rotates halves (x_i, x_{i+D/2}), so q/k
rows are permuted per head when written (the same reordering transformers' GGUF loader undoes); the
others use llama.cpp's NEOX rope: no permutation. What llama.cpp cannot compute exactly is refused
with one line naming the family and the feature (see unsupported_reason).

The runner is llama.cpp itself, through llama-cpp-python (compiled for this CPU by scripts/setup.sh),
in a subprocess, so that a crash in native code is reported instead of killing edgeslm: see gguf_worker.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeslm.errors import EdgeSLMError
from edgeslm.schemes import get_scheme

from .base import ExportContext, Runner, Target

GGUF_FILE = "model.gguf"
Q_BLOCK = 32  # weights per Q4_0 / Q8_0 block


@dataclass(frozen=True)
class Family:
    """How one edgeslm family is written for llama.cpp. Tensor names are gguf MODEL_TENSOR members;
    each maps to the modules of a layer whose rows it holds, in order (Phi-3's ffn_up is gate then up)."""

    arch: str
    norms: dict  # per-layer norm module (absent ones skipped) -> MODEL_TENSOR member
    projections: dict = field(default_factory=lambda: dict(PROJECTIONS))
    interleaved_rope: bool = False  # llama.cpp's llama arch rotates adjacent pairs: permute q/k rows
    norm_plus_one: bool = False  # Gemma stores w - 1 and scales by 1 + w; llama.cpp scales by w
    output: str = "optional"  # "optional": output.weight when untied; "required": always; "tied": never read
    windows: str = "none"  # "per_layer": sliding_window + its pattern; "ignored": llama.cpp attends to all
    softcaps: dict = field(default_factory=dict)  # "attn"/"final" -> "always" (llama.cpp applies one) or "optional"
    large_layers: int | None = None  # n_layer at which llama.cpp scales queries by 1/sqrt(hidden/heads)
    rope_types: tuple = ("default",)
    local_rope_base: bool = False  # local layers rotate with their own base (rope.freq_base_swa)
    biases: tuple = ()  # which of "qkv", "o" llama.cpp reads for this arch


PROJECTIONS = {"ATTN_Q": ("self_attn.q_proj",), "ATTN_K": ("self_attn.k_proj",), "ATTN_V": ("self_attn.v_proj",),
               "ATTN_OUT": ("self_attn.o_proj",), "FFN_GATE": ("mlp.gate_proj",), "FFN_UP": ("mlp.up_proj",),
               "FFN_DOWN": ("mlp.down_proj",)}
PLAIN_NORMS = {"attn_norm": "ATTN_NORM", "mlp_norm": "FFN_NORM"}
SANDWICH_NORMS = {"attn_norm": "ATTN_NORM", "attn_post_norm": "ATTN_POST_NORM", "mlp_norm": "FFN_PRE_NORM",
                  "mlp_post_norm": "FFN_POST_NORM"}
FAMILIES = {
    "llama": Family("llama", PLAIN_NORMS, interleaved_rope=True, rope_types=("default", "llama3"),
                    biases=("qkv", "o")),
    "qwen2": Family("qwen2", PLAIN_NORMS, biases=("qkv",)),
    "gemma2": Family("gemma2", SANDWICH_NORMS, norm_plus_one=True, output="tied", windows="per_layer",
                     softcaps={"attn": "always", "final": "always"}, large_layers=46),
    "gemma3": Family("gemma3", {**SANDWICH_NORMS, "self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM"},
                     norm_plus_one=True, windows="per_layer", softcaps={"final": "optional"}, large_layers=62,
                     rope_types=("default", "linear"), local_rope_base=True),
    "phi3": Family("phi3", PLAIN_NORMS, windows="ignored",
                   projections={**{k: v for k, v in PROJECTIONS.items() if k != "FFN_GATE"},
                                "FFN_UP": ("mlp.gate_proj", "mlp.up_proj")}),
    "stablelm": Family("stablelm", PLAIN_NORMS, output="required", biases=("qkv",)),
}

# transformers pre-tokenizer (tokenizer.json) -> llama.cpp's tokenizer.ggml.pre. Each entry is a
# regex llama.cpp applies the same way; an unknown one is refused rather than guessed, since
# llama.cpp would then split text differently from the reference tokenizer.
GPT2_BYTELEVEL = "bytelevel-regex"
PRE_TOKENIZERS = {
    GPT2_BYTELEVEL: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


# ---------------------------------------------------------------- tensor re-ordering (exact)


def rope_interleave_rows(n_heads: int) -> callable:
    """Row order that turns transformers' half-split RoPE layout into llama.cpp's interleaved one."""

    def order(rows: int) -> torch.Tensor:
        d = rows // n_heads
        within = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=1).reshape(-1)
        return (torch.arange(n_heads)[:, None] * d + within[None, :]).reshape(-1)

    return order


# ---------------------------------------------------------------- the target


class GGUFTarget(Target):
    name = "gguf"
    description = "GGUF for llama.cpp (F32/F16, Q4_0 from symmetric int4, Q8_0 from q8c), verified in llama.cpp"
    artifact_suffix = GGUF_FILE

    def unavailable_reason(self) -> str | None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            return "the gguf package is missing: pip install gguf==0.19.0"
        return None

    def runtime_reason(self) -> str | None:
        """None when llama.cpp can run here (needed by load/verify, not by export)."""
        if llama_cpp_python() is None:
            return ("llama.cpp (llama-cpp-python) is not installed: run `bash scripts/setup.sh` "
                    "or set EDGESLM_LLAMA_CPP_PYTHON to a Python that has it (export alone: --no-verify)")
        return None

    def unsupported_reason(self, model, scheme) -> str | None:
        spec = model.spec
        reason = _family_reason(model)
        if reason:
            return reason
        reason = scheme.target_reason("gguf")
        if reason:
            return reason
        if scheme.quantized:
            ks = {spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim}
            bad = sorted(k for k in ks if k % Q_BLOCK)
            if bad:
                return f"GGUF quantized blocks need every input size divisible by 32; {bad[0]} is not"
        return None

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        import gguf

        reason = self.unsupported_reason(model, scheme)
        if reason:
            raise EdgeSLMError(reason)
        spec = model.spec
        fam = FAMILIES[spec.family]
        if fam.windows == "ignored" and spec.has_local_layers and ctx.context_length > spec.sliding_window:
            raise EdgeSLMError(f"{spec.family}: a {spec.sliding_window}-token sliding window (llama.cpp's {fam.arch} "
                               f"arch attends over the whole context); export with --context {spec.sliding_window} "
                               "or less, where the window masks nothing")
        arch = fam.arch
        writer = gguf.GGUFWriter(str(out / GGUF_FILE), arch)
        writer.add_name(Path(ctx.model_name or "model").name)
        writer.add_context_length(spec.max_position)
        writer.add_embedding_length(spec.hidden_size)
        writer.add_block_count(spec.num_layers)
        writer.add_feed_forward_length(spec.intermediate_size)
        writer.add_head_count(spec.num_heads)
        writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(spec.rotary_dim)
        _add_family_metadata(writer, model, fam)
        writer.add_vocab_size(spec.vocab_size)
        writer.add_file_type(_file_type(scheme))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        tokenizer_fields = _add_tokenizer(writer, ctx, spec.vocab_size)
        types = self._add_tensors(writer, model, scheme, fam)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        fields = {"gguf_arch": arch, "ggml_types": types, **tokenizer_fields, "kv_cache": _kv_cache(scheme),
                  "runtime": "llama.cpp (llama-cpp-python)"}
        if scheme.name != "f32" or spec.act == "gelu_tanh":
            fields["parity_bounds"] = self.derived_bounds(model, scheme, ctx)
        return fields

    def derived_bounds(self, model, scheme, ctx: ExportContext) -> dict:
        """llama.cpp multiplies Q4_0 / Q8_0 weights by activations rounded to Q8_0 (8 bits per block
        of 32, fp16 scale), F16 weights by fp16 activations, and keeps an f16 KV cache (f32 weights
        run with an f32 cache and plain fp32 products); its CPU GELU reads an fp16 table. Bounds from
        that arithmetic simulated on the reference (parity.derive_bounds)."""
        import contextlib

        from edgeslm.simulate import fp16_round_trip, q8_0, simulated
        from edgeslm.parity import derive_bounds

        exact_products = scheme.name == "f32"
        gelu = model.spec.act == "gelu_tanh"
        rounding = None if exact_products else fp16_round_trip if scheme.name == "f16" else q8_0

        @contextlib.contextmanager
        def simulate(reference):
            with simulated(reference, activations=rounding, cache_dtype=None if exact_products else torch.float16) as m:
                with gelu_fp16_table(m) if gelu else contextlib.nullcontext():
                    yield m

        parts = [] if exact_products else [
            f"{'fp16' if scheme.name == 'f16' else 'Q8_0'} activations into every matrix product, f16 KV cache"]
        if gelu:
            parts.append("GELU from an fp16 table")
        return derive_bounds(model, simulate, ctx.tokenizer, ctx.context_length, "llama.cpp: " + "; ".join(parts),
                             ppl_rel=0.002 if exact_products else 0.02, reference_key=ctx.reference or None)

    def _add_tensors(self, writer, model, scheme, fam: Family) -> dict:
        import gguf

        from edgeslm.schemes.base import QuantizedLinear

        spec = model.spec
        f16 = scheme.name == "f16"
        counts: dict[str, int] = {}

        def encode(module_or_tensor, rows=None):
            m = module_or_tensor
            if isinstance(m, QuantizedLinear):  # the scheme's own GGML encoding of its codes
                data, qtype = m.ggml(rows)
            else:
                t = m if isinstance(m, torch.Tensor) else m.weight
                t = t.detach().cpu()
                if rows is not None:
                    t = t[rows]
                if f16 and t.dim() == 2:
                    data, qtype = t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
                else:
                    data, qtype = t.float().numpy(), gguf.GGMLQuantizationType.F32
            return data, qtype

        arch_tensors = gguf.MODEL_TENSORS[{v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[fam.arch]]

        def put(key: str, parts, bid=None, suffix="weight", rows=None):
            """One tensor named by its MODEL_TENSOR member, from one module or tensor or from the rows
            of several (concatenated in order, each encoded alone: blocks never cross rows)."""
            if gguf.MODEL_TENSOR[key] not in arch_tensors:
                raise ValueError(f"{key} is not a tensor of llama.cpp's {fam.arch} arch")
            encoded = [encode(m, rows) for m in (parts if isinstance(parts, tuple) else (parts,))]
            qtype = encoded[0][1]
            data = np.concatenate([d for d, _ in encoded]) if len(encoded) > 1 else encoded[0][0]
            name = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[key]].format(bid=bid)}.{suffix}"
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1

        def put_norm(key: str, norm, bid=None):
            w = norm.weight.detach().float()
            put(key, w + 1.0 if fam.norm_plus_one else w, bid)  # the same fp32 factor the reference uses
            if norm.bias is not None:
                put(key, norm.bias, bid, "bias")

        put("TOKEN_EMBD", model.embed_tokens)
        if model.lm_head is not None:
            put("OUTPUT", model.lm_head)
        elif fam.output == "required":  # the tied table again, as the output matrix llama.cpp expects
            put("OUTPUT", model.embed_tokens)
        put_norm("OUTPUT_NORM", model.norm)
        rope_freqs = _llama3_rope_factors(model)
        if rope_freqs is not None:
            put("ROPE_FREQS", rope_freqs)
        rows = {}
        if fam.interleaved_rope:
            rows["self_attn.q_proj"] = rope_interleave_rows(spec.num_heads)(spec.num_heads * spec.head_dim)
            rows["self_attn.k_proj"] = rope_interleave_rows(spec.num_kv_heads)(spec.num_kv_heads * spec.head_dim)
        for i, layer in enumerate(model.layers):
            for module, key in fam.norms.items():
                norm = _submodule(layer, module)
                if norm is not None:  # StableLM's parallel residual has no MLP norm
                    put_norm(key, norm, i)
            for key, modules in fam.projections.items():
                mods = tuple(layer.get_submodule(m) for m in modules)
                put(key, mods, i, rows=rows.get(modules[0]))
                if mods[0].bias is not None:
                    put(key, torch.cat([m.bias.detach() for m in mods]), i, "bias", rows.get(modules[0]))
        return counts

    def parity_bounds(self, scheme) -> dict:
        """f32 runs with an f32 KV cache and fp32 dot products: exact. Every other scheme's bounds are
        derived at export (derived_bounds) and read from the manifest; these are the fallback for
        an artifact without them: perplexity only. Measured on SmolLM2-135M q4g32-rtn (2026-11-28):
        max |logit diff| 1.29, 64/64 greedy tokens identical, Brown perplexity +1.00%."""
        if scheme.name == "f32":
            return {**super().parity_bounds(scheme), "ppl_rel": 0.001}
        return {"max_abs_logit": None, "tokens_identical": False, "ppl_rel": 0.02,
                "basis": "an artifact without derived bounds: perplexity only"}

    def load(self, folder: Path, manifest: dict) -> Runner:
        reason = self.runtime_reason()
        if reason:
            raise EdgeSLMError(reason)
        context = int(manifest.get("context_length", 512))
        kv = manifest.get("kv_cache") or _kv_cache(get_scheme(manifest.get("scheme", "f32")))
        return LlamaCppRunner(Path(folder) / GGUF_FILE, context, kv=kv)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        import gguf

        reader = gguf.GGUFReader(str(Path(folder) / GGUF_FILE))
        types: dict[str, int] = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        return {"gguf_arch": reader.fields["general.architecture"].contents(), "ggml_types": types,
                "tensors": len(reader.tensors)}


def _family_reason(model) -> str | None:
    """None when llama.cpp's arch for this family computes exactly what the reference does, else one
    line naming the family and the feature llama.cpp lacks."""
    spec, name = model.spec, model.spec.family
    fam = FAMILIES.get(name)
    if fam is None:
        return f"the gguf target supports the {', '.join(FAMILIES)} families, not {name}"
    arch = f"llama.cpp's {fam.arch} arch"
    if fam.interleaved_rope and spec.rotary_dim != spec.head_dim:
        return f"{name}: partial rotary embeddings ({arch} rotates every dimension in adjacent pairs)"
    rope_type = _rope_type(model.hf_config)
    if rope_type not in fam.rope_types:
        return f"{name}: {rope_type!r} RoPE ({arch} is written here with {' or '.join(fam.rope_types)} RoPE)"
    if spec.has_local_layers:
        # a window at least max_position long never masks anything, so an arch without windows is exact
        if fam.windows == "none" or (fam.windows == "ignored" and spec.sliding_window < spec.max_position):
            return f"{name}: a {spec.sliding_window}-token sliding window ({arch} attends over the whole context)"
        local = _rope_params(model.hf_config, "sliding_attention")
        if fam.local_rope_base and local.get("rope_type", "default") != "default":
            return f"{name}: {local['rope_type']!r} RoPE on local layers ({arch} rotates them unscaled)"
    for kind, present in (("qkv", spec.qkv_bias), ("o", spec.o_bias)):
        if present and kind not in fam.biases:
            return f"{name}: {'q/k/v' if kind == 'qkv' else 'attention output'} biases ({arch} reads none)"
    if spec.mlp_bias:
        return f"{name}: MLP biases ({arch} reads none)"
    for kind, value in (("attn", spec.attn_softcap), ("final", spec.final_softcap)):
        how = fam.softcaps.get(kind)
        if value is not None and how is None:
            return f"{name}: a {kind} logit soft-cap ({arch} applies none)"
        if value is None and how == "always":
            return f"{name}: no {kind} logit soft-cap ({arch} always applies one)"
    if fam.output == "tied" and not spec.tie_embeddings:
        return f"{name}: a separate lm_head ({arch} multiplies by the embedding table)"
    if fam.large_layers is not None:
        # llama.cpp derives the query scale from the shapes, as Gemma's released models set it
        n = spec.hidden_size // spec.num_heads if spec.num_layers == fam.large_layers else spec.head_dim
        if abs(spec.attn_scale * n ** 0.5 - 1) > 1e-6:
            return (f"{name}: query_pre_attn_scalar {spec.attn_scale ** -2:g} ({arch} scales queries by "
                    f"1/sqrt({n}) and reads no key for another value)")
    return None


@contextlib.contextmanager
def gelu_fp16_table(model):
    """The model's GELU MLPs computing as llama.cpp's CPU backend does: the gate rounded to fp16 and
    looked up in an fp16 table of the tanh GELU (0 at or below -10, the input at or above 10), then
    multiplied by up in fp32."""
    import types

    from torch.nn import functional as F

    from edgeslm.model import MLP

    def forward(self, x):
        g = self.gate_proj(x)
        table = F.gelu(g.half().float(), approximate="tanh").half().to(g.dtype)
        act = torch.where(g <= -10, torch.zeros_like(g), torch.where(g >= 10, g, table))
        return self.down_proj(act * self.up_proj(x))

    mlps = [m for m in model.modules() if isinstance(m, MLP) and m.act == "gelu_tanh"]
    for m in mlps:
        m.forward = types.MethodType(forward, m)
    try:
        yield model
    finally:
        for m in mlps:
            del m.forward  # the instance attribute; the class's forward shows again


def _submodule(module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _add_family_metadata(writer, model, fam: Family):
    """The metadata llama.cpp reads for this arch: norm epsilon, RoPE bases and scaling, sliding
    windows and their per-layer pattern, soft-caps."""
    import gguf

    spec = model.spec
    if spec.norm == "layer":
        writer.add_layer_norm_eps(spec.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(spec.norm_eps)
    full = _rope_params(model.hf_config)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if fam.windows == "per_layer":
        if spec.has_local_layers:
            writer.add_sliding_window(spec.sliding_window)
        # the pattern as one flag per layer, so llama.cpp does not assume its default period
        writer.add_sliding_window_pattern([bool(local and spec.has_local_layers) for local in spec.layer_is_local])
        if fam.local_rope_base and spec.has_local_layers:
            writer.add_rope_freq_base_swa(float(_rope_params(model.hf_config, "sliding_attention")
                                                .get("rope_theta", 10000.0)))
    if spec.attn_softcap is not None:
        writer.add_attn_logit_softcapping(float(spec.attn_softcap))
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(float(spec.final_softcap))


def _kv_cache(scheme) -> str:
    """f32 weights run with an f32 KV cache, so verify sees the weights alone; else llama.cpp's default f16."""
    return "f32" if scheme.name == "f32" else "f16"


def _rope_params(hf_config, layer_type: str = "full_attention") -> dict:
    """RoPE settings, or for models keyed by layer type (Gemma 3), those of `layer_type`'s layers."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params if "rope_type" in params or "rope_theta" in params else params.get(layer_type, params)


def _rope_type(hf_config) -> str:
    return _rope_params(hf_config).get("rope_type", "default")


def _llama3_rope_factors(model) -> torch.Tensor | None:
    """Llama 3's frequency scaling as llama.cpp's rope_freqs: theta_i is divided by factor_i."""
    if _rope_type(model.hf_config) != "llama3":
        return None
    spec = model.spec
    base = float(_rope_params(model.hf_config)["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, spec.rotary_dim, 2, dtype=torch.float64) / spec.rotary_dim))
    scaled = model.inv_freq_default.double()
    return (plain / scaled).float()


def _file_type(scheme) -> int:
    import gguf

    return getattr(gguf.LlamaFileType, scheme.ggml_file_type())


def _pre_tokenizer_key(tokenizer_json: dict) -> str | None:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return GPT2_BYTELEVEL
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(parts) == 2 and len(splits) == 1 and len(levels) == 1 and not levels[0].get("use_regex", True):
            return splits[0].get("pattern", {}).get("Regex")
    return None


def _add_tokenizer(writer, ctx: ExportContext, vocab_size: int) -> dict:
    """A GPT-2-style byte-level BPE tokenizer into tokenizer.ggml.*; without one, llama.cpp's no_vocab."""
    import gguf

    folder = Path(ctx.reference) if ctx.reference else None
    tok_json = folder / "tokenizer.json" if folder else None
    if ctx.tokenizer is None or tok_json is None or not tok_json.is_file():
        # Token ids in, logits out: what verify and the benchmarks feed. Text needs a tokenizer.
        writer.add_tokenizer_model("no_vocab")
        return {"tokenizer": "none (token ids only)"}
    raw = json.loads(tok_json.read_text())
    model = raw.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (raw.get("decoder") or {}).get("type") != "ByteLevel":
        raise EdgeSLMError("the gguf target supports byte-level BPE (GPT-2 style) tokenizers only; "
                           f"this one is {model.get('type')} with decoder {(raw.get('decoder') or {}).get('type')}")
    key = _pre_tokenizer_key(raw)
    pre = PRE_TOKENIZERS.get(key)
    if pre is None:
        raise EdgeSLMError("the tokenizer's pre-tokenizer is not one llama.cpp is known here to reproduce; "
                           "exporting it would make llama.cpp split text differently")
    vocab = ctx.tokenizer.get_vocab()
    by_id = {i: s for s, i in vocab.items()}
    added = {int(i): t for i, t in getattr(ctx.tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:  # a BPE GGUF without merges is a file llama.cpp (and edgeslm) cannot read back
        raise EdgeSLMError(f"{tok_json} has no BPE merges; the gguf target needs a complete byte-level BPE tokenizer")
    special.add_to_gguf(writer, quiet=True)
    # Whether text starts with BOS: what the reference tokenizer itself does (llama.cpp's default varies).
    probe = ctx.tokenizer("a").input_ids
    bos = getattr(ctx.tokenizer, "bos_token_id", None)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_space_prefix(bool((raw.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    return {"tokenizer": "gpt2", "tokenizer_pre": pre}


# ---------------------------------------------------------------- the runner: llama.cpp in a subprocess


def llama_cpp_python() -> str | None:
    """A Python interpreter that can import llama_cpp, or None."""
    candidates = [os.environ.get("EDGESLM_LLAMA_CPP_PYTHON"), sys.executable]
    for py in candidates:
        if py and Path(py).is_file():
            ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return py
    return None


def llama_cpp_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip()


class LlamaCppWorker:
    """One llama.cpp process (gguf_worker.py) holding one model and its KV cache."""

    def __init__(self, gguf_path: Path, context: int, threads: int = 2, python: str | None = None, kv: str = "f16"):
        python = python or llama_cpp_python()
        if python is None:
            raise EdgeSLMError(GGUFTarget().runtime_reason())
        import tempfile

        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("gguf_worker.py")), str(gguf_path),
                                      str(context), str(threads), kv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        hello = self._read_header()
        self.vocab = int(hello["vocab"])
        self.version = hello["llama_cpp_python"]

    def _read_header(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise EdgeSLMError(self._death())
        header = json.loads(line)
        if "error" in header:
            raise EdgeSLMError(f"llama.cpp: {header['error']}")
        return header

    def _death(self) -> str:
        """Why the worker ended: its exit status or signal, and the last lines of its stderr (llama.cpp's
        warnings and errors, or the Python stack that faulthandler prints at a crash)."""
        import signal

        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with status {code}")
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(("Extension modules:", "Thread 0x", "Current thread 0x"))]
        tail = lines[-5:]
        fatal = [ln for ln in lines[:-5] if ln.startswith("Fatal Python error")][:1]
        return f"llama.cpp worker {how}: {' | '.join(fatal + tail) or 'it wrote nothing to stderr'}"

    def request(self, **req) -> tuple[dict, np.ndarray | None]:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        header = self._read_header()
        if "rows" in header:
            n = header["rows"] * header["vocab"] * 4
            data = self.proc.stdout.read(n)
            return header, np.frombuffer(data, dtype=np.float32).reshape(header["rows"], header["vocab"])
        return header, None

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._stderr.close()


class LlamaCppRunner(Runner):
    def __init__(self, gguf_path: Path, context: int, threads: int = 2, kv: str = "f16"):
        self.worker = LlamaCppWorker(gguf_path, context, threads, kv=kv)
        self.runtime = f"llama.cpp (llama-cpp-python {self.worker.version})"

    def reset(self):
        pass  # each eval names its start position; llama.cpp drops cache entries at or after it

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        _, logits = self.worker.request(op="eval", tokens=tokens[0].tolist(), start=int(start), logits="all")
        return torch.from_numpy(logits.copy()).unsqueeze(0)

    def decode(self, token: int, pos: int) -> torch.Tensor:
        _, logits = self.worker.request(op="eval", tokens=[int(token)], start=int(pos), logits="last")
        return torch.from_numpy(logits[0].copy())

    def tokenize(self, text: str) -> list[int]:
        return self.worker.request(op="tokenize", text=text)[0]["tokens"]

    def close(self):
        self.worker.close()


TARGET = GGUFTarget()
