"""DecoderSpec: the handful of facts about a model family that the one decoder needs.

transformers' config classes stay the source of truth (we load them, save them, and use their
RoPE helpers); this module reads them once into a flat, frozen description so the decoder never
branches on model_type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import EdgeSLMError


@dataclass(frozen=True)
class Family:
    """What a family's transformers config means, as data: a new Llama-shaped family is one line of
    SUPPORTED_MODEL_TYPES, a structurally new one one entry here (plus, if the decoder lacks the
    structure, one DecoderSpec switch)."""

    norm: str = "rms"  # "rms" | "rms_gemma" (weight stored as w - 1) | "layer"
    eps_key: str = "rms_norm_eps"
    gemma: bool = False  # sqrt(hidden) embedding scale, query_pre_attn_scalar, soft-caps, sandwich norms
    qk_norm: bool = False
    rope_per_layer_type: bool = False  # rope_parameters keyed by layer type (Gemma 3's two bases)
    qkv_bias_key: str = "attention_bias"
    qkv_bias_always: bool = False
    o_bias: bool = True  # o_proj has a bias when attention_bias is set
    top_level_partial_rotary: bool = False  # partial_rotary_factor read at the config's top level first
    parallel_residual_key: str | None = None
    fused_projections: bool = False  # the HF checkpoint stores qkv_proj and gate_up_proj fused
    refused: tuple = ()  # (config key, message) pairs this decoder cannot express


FAMILIES = {
    "llama": Family(),
    "qwen2": Family(qkv_bias_always=True, o_bias=False),
    "phi3": Family(top_level_partial_rotary=True, fused_projections=True),
    "gemma2": Family(norm="rms_gemma", gemma=True),
    "gemma3": Family(norm="rms_gemma", gemma=True, qk_norm=True, rope_per_layer_type=True),
    "stablelm": Family(norm="layer", eps_key="layer_norm_eps", qkv_bias_key="use_qkv_bias", o_bias=False,
                       parallel_residual_key="use_parallel_residual",
                       refused=(("qk_layernorm", "StableLM with qk_layernorm (per-head LayerNorm) is not supported yet"),)),
}

# model_type -> family (a key of FAMILIES)
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",  # Llama 3.x, SmolLM/SmolLM2, TinyLlama
    "qwen2": "qwen2",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "stablelm": "stablelm",
}


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # < head_dim for partial rotary (StableLM 2)
    norm: str  # "rms" | "rms_gemma" (weight stored as w-1) | "layer"
    norm_eps: float
    act: str  # "silu" | "gelu_tanh"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    embed_scale: float | None  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float  # 1/sqrt(query_pre_attn_scalar or head_dim)
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None
    layer_is_local: tuple[bool, ...]  # per layer: sliding-window (local) or global attention
    layer_rope: tuple[str, ...]  # per layer: key into the rope table (Gemma 3 has two bases)
    sandwich_norms: bool  # Gemma 2/3: norms before and after attention and MLP
    qk_norm: bool  # Gemma 3: RMSNorm over head_dim on q and k
    parallel_residual: bool  # StableLM option: attention and MLP read the same normed input
    max_position: int
    fused_projections: bool = False  # the HF checkpoint stores qkv_proj / gate_up_proj fused (Phi-3)

    @property
    def has_local_layers(self) -> bool:
        return self.sliding_window is not None and any(self.layer_is_local)


def _get(cfg, name, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


def spec_from_hf_config(cfg) -> DecoderSpec:
    """Reads a transformers PretrainedConfig; refuses what the decoder cannot express, or a config
    whose numbers cannot describe a model, with one EdgeSLMError."""
    try:
        spec = _spec(cfg)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise EdgeSLMError(f"config.json does not describe a model edgeslm can build ({type(e).__name__}: {e})") from None
    check_spec(spec)
    return spec


def check_spec(s: DecoderSpec):
    """Shapes that cannot work: zero or negative sizes, heads that do not divide, windows below 1."""
    def positive(name, value):
        if type(value) is not int or value < 1:
            raise EdgeSLMError(f"config.json: {name} must be a positive integer (got {value!r})")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position"):
        positive(name, getattr(s, name))
    if s.num_heads % s.num_kv_heads:
        raise EdgeSLMError(f"config.json: {s.num_heads} attention heads are not a multiple of {s.num_kv_heads} kv heads")
    if s.rotary_dim < 2 or s.rotary_dim > s.head_dim or s.rotary_dim % 2:
        raise EdgeSLMError(f"config.json: rotary dimension {s.rotary_dim} does not fit head_dim {s.head_dim}")
    if len(s.layer_is_local) != s.num_layers:
        raise EdgeSLMError(f"config.json: {len(s.layer_is_local)} layer_types for {s.num_layers} layers")
    if s.sliding_window is not None:
        positive("sliding_window", s.sliding_window)
    for name in ("norm_eps", "attn_scale"):
        if not (isinstance(getattr(s, name), float) and getattr(s, name) > 0 and math.isfinite(getattr(s, name))):
            raise EdgeSLMError(f"config.json: {name} must be a positive finite number (got {getattr(s, name)!r})")
    for name in ("attn_softcap", "final_softcap"):
        v = getattr(s, name)
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise EdgeSLMError(f"config.json: {name} must be a positive number or null (got {v!r})")
    if (s.num_layers > 1024 or s.hidden_size > 1 << 16 or s.vocab_size > 1 << 22 or s.head_dim > 1024
            or s.intermediate_size > 1 << 18 or s.num_heads > 1024 or s.max_position > 1 << 24):
        raise EdgeSLMError("config.json: sizes beyond any small language model (a corrupt config?)")


def _spec(cfg) -> DecoderSpec:
    model_type = getattr(cfg, "model_type", None)
    family = SUPPORTED_MODEL_TYPES.get(model_type)
    if family is None:
        raise EdgeSLMError(
            f"unknown architecture {model_type!r}; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    fam = FAMILIES[family]
    for key, message in fam.refused:
        if _get(cfg, key, False):
            raise EdgeSLMError(message)

    hidden = cfg.hidden_size
    num_heads = cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim", hidden // num_heads)
    num_layers = cfg.num_hidden_layers
    rope_params = _get(cfg, "rope_parameters", {}) or {}
    partial = rope_params.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0))
    if fam.top_level_partial_rotary:
        # Phi-3's partial_rotary_factor is for Phi-4-mini style configs; head_dim is derived
        partial = _get(cfg, "partial_rotary_factor", partial)

    layer_types = _get(cfg, "layer_types", None)
    window = _get(cfg, "sliding_window", None)
    if layer_types is None:
        # Phi-3 (and Mistral-like configs) apply the window to every layer when it is set.
        layer_types = ["sliding_attention" if window else "full_attention"] * num_layers
    is_local = tuple(t == "sliding_attention" for t in layer_types)
    if not any(is_local):
        window = None
    layer_rope = tuple(layer_types) if fam.rope_per_layer_type else ("default",) * num_layers

    scalar = _get(cfg, "query_pre_attn_scalar", None) if fam.gemma else None
    act_name = _get(cfg, "hidden_activation", None) or _get(cfg, "hidden_act", "silu")
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act_name)
    if act is None:
        raise EdgeSLMError(f"unsupported activation {act_name!r}")
    attention_bias = bool(_get(cfg, "attention_bias", False))

    return DecoderSpec(
        family=family,
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        intermediate_size=cfg.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", num_heads),
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        norm=fam.norm,
        norm_eps=float(getattr(cfg, fam.eps_key)),
        act=act,
        qkv_bias=bool(_get(cfg, fam.qkv_bias_key, False)) or fam.qkv_bias_always,
        o_bias=attention_bias and fam.o_bias,
        mlp_bias=bool(_get(cfg, "mlp_bias", False)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        embed_scale=hidden**0.5 if fam.gemma else None,
        attn_scale=(scalar if scalar else head_dim) ** -0.5,
        attn_softcap=_get(cfg, "attn_logit_softcapping", None) if fam.gemma else None,
        final_softcap=_get(cfg, "final_logit_softcapping", None) if fam.gemma else None,
        sliding_window=window,
        layer_is_local=is_local,
        layer_rope=layer_rope,
        sandwich_norms=fam.gemma,
        qk_norm=fam.qk_norm,
        parallel_residual=bool(fam.parallel_residual_key and _get(cfg, fam.parallel_residual_key, False)),
        max_position=int(_get(cfg, "max_position_embeddings", 2048)),
        fused_projections=fam.fused_projections,
    )
