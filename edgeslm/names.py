"""The one table between transformers' parameter names and the Decoder's, used both ways: by
loading (HF -> ours) and by fine-tuning's export back to a Hugging Face folder (ours -> HF).

Every family shares the layout `model.layers.N.<module>.<param>`; what differs is data:
  - the norms' names (Gemma's sandwich norms take the names Llama uses for other norms);
  - fused projections (Phi-3's qkv_proj and gate_up_proj), split in ours;
  - Gemma 3's multimodal checkpoints nest the text model under `model.language_model.`.
"""

from __future__ import annotations

import torch

# Phi-3 and friends: HF fused module -> our modules, in the order of the fused rows
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
NESTED_PREFIX = "model.language_model."


def norm_names(spec) -> dict[str, str]:
    """Our norm module -> transformers' (per layer)."""
    if spec.sandwich_norms:
        return {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def fused_sizes(spec, fused: str) -> list[int]:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return [q, kv, kv] if fused == "self_attn.qkv_proj" else [spec.intermediate_size] * 2


def hf_to_ours(state: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """transformers' state dict -> the Decoder's (fused projections split; a tied lm_head dropped)."""
    norms = {hf: ours for ours, hf in norm_names(spec).items()}
    out = {}
    for name, tensor in state.items():
        if name.startswith(NESTED_PREFIX):
            name = "model." + name[len(NESTED_PREFIX):]
        if name == "lm_head.weight":
            if not spec.tie_embeddings:
                out[name] = tensor
            continue
        if not name.startswith("model."):
            continue
        parts = name[len("model."):].split(".")
        if parts[0] == "layers" and len(parts) >= 4:
            prefix, module, param = ".".join(parts[:2]), ".".join(parts[2:-1]), parts[-1]
            if module in FUSED:
                for ours, t in zip(FUSED[module], tensor.split(fused_sizes(spec, module), dim=0)):
                    out[f"{prefix}.{ours}.{param}"] = t
                continue
            module = norms.get(module, module)
            out[f"{prefix}.{module}.{param}"] = tensor
        else:
            out[".".join(parts)] = tensor
    return out


def ours_to_hf(state: dict[str, torch.Tensor], spec, fuse: bool) -> dict[str, torch.Tensor]:
    """The Decoder's state dict -> transformers' (fuse: re-join Phi-3's projections)."""
    norms = norm_names(spec)
    out = {}
    for name, tensor in state.items():
        if name.startswith("inv_freq"):
            continue
        if name.startswith("lm_head."):
            out[name] = tensor
            continue
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] in norms:
            parts[2] = norms[parts[2]]
        out["model." + ".".join(parts)] = tensor
    if fuse:
        for i in range(spec.num_layers):
            prefix = f"model.layers.{i}."
            for fused, parts in FUSED.items():
                for param in ("weight", "bias"):
                    pieces = [out.pop(f"{prefix}{p}.{param}", None) for p in parts]
                    if pieces[0] is not None:
                        out[f"{prefix}{fused}.{param}"] = torch.cat(pieces)
    return out
