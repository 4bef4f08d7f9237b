"""Tiny random configs of every supported family, and helpers to build both decoders from them."""

from __future__ import annotations

import torch

from edgeslm.loading import build_decoder

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2)  # large enough that soft-caps and windows bite


def tiny_config(family: str, **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config,
                              StableLmConfig)

    kw = dict(COMMON)
    if family == "llama":
        cfg = LlamaConfig(**kw, head_dim=16, tie_word_embeddings=False)
    elif family == "llama3":  # Llama 3.2's rope scaling
        cfg = LlamaConfig(**kw, head_dim=16, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":
        cfg = Qwen2Config(**kw, tie_word_embeddings=True)
    elif family == "phi3":
        cfg = Phi3Config(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "gemma2":
        # strong soft-caps and a small window, so errors in either show
        cfg = Gemma2Config(**kw, head_dim=16, sliding_window=8, attn_logit_softcapping=0.5,
                           final_logit_softcapping=0.2, query_pre_attn_scalar=24)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**dict(kw, num_hidden_layers=6), head_dim=16, sliding_window=8,
                               query_pre_attn_scalar=24, layer_types=None)
    elif family == "stablelm":
        cfg = StableLmConfig(**kw, use_qkv_bias=True)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return cfg


FAMILIES = ["llama", "llama3", "qwen2", "phi3", "gemma2", "gemma3", "stablelm"]


def tiny_pair(family: str, seed: int = 0, **overrides):
    """-> (transformers eager model, our Decoder) with the same random weights, fp32, eval."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one shows
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = build_decoder(hf.config, hf.state_dict())
    return hf, ours
