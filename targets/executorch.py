"""ExecuTorch target: a program lowered to XNNPACK that speaks ExecuTorch's LLM-runner contract,
model.pte with its weights in model.ptd (ExecuTorch's program-data separation).

  forward(tokens [1, T], input_pos [1]) -> logits [1, 1, V]     T dynamic, 1..get_max_seq_len;
                                                                 the last position's logits only
  constant methods: get_max_seq_len, get_max_context_len, get_vocab_size, get_n_layers,
  use_kv_cache, use_sdpa_with_kv_cache, enable_dynamic_shape, get_bos_id, get_eos_ids

which is what ExecuTorch's TextLLMRunner (C++, and the wheel's Python binding; Android's LlmModule
and the iOS runner wrap it) reads and calls, with tokenizer/tokenizer.json as its tokenizer file and
model.ptd as its data file.
The KV cache lives in the program's mutable buffers, owned by the attention modules that replace
the decoder's KVAttention in every layer (executorch_attention.py): the runtime's own
llama::update_cache + llama::custom_sdpa where the attention has no soft-cap, a ring buffer for
sliding-window layers, the decoder's reference attention elsewhere (Gemma 2's soft-cap). A
sequence starts at input_pos 0 and the cache needs no reset.

q/k/v and gate/up are fused into one linear each (they share their input: one GEMM, one int8
range per token and bin, one calibration).

int4 (symmetric q4g{G}-*): 8-bit dynamic activations x OUR int4 weights. Each Int4Linear becomes
linears whose weights are torchao IntxUnpackedToInt8Tensors built from our codes and fp16 scales
(codes - 8 as int4 values, zero point 0, our scales), never re-quantized from float; export checks
that they dequantize to exactly our int4 weights. XNNPACK packs them into its 4-bit blockwise
kernels. The tied int4 table is stored once: the lm_head is an 8da4w linear over our codes, and the
embedding gathers rows (in plain ops) from a buffer holding exactly the bytes XNNPACK serializes for
that linear. Both land in model.ptd, whose named data dedupes equal blobs; a .pte alone cannot share
them (its own constants and XNNPACK's named data are separate segments, and the 1.5 runtime resolves
a constant by name only from an external data file).

Activation ranges: XNNPACK quantizes a linear's input with one int8 range per token, so a few
input groups with large activations wash out the rest (SmolLM2-135M q4g32-gptq: +2.9% Brown
perplexity over the int4 reference). Export therefore runs the int4 model over calibration text and
records each linear's largest |x| per input group. For q/k/v, gate/up and o_proj, each group is
divided by a power of two near the square root of that value where the input is made (a norm's
output scale, v_proj's output rows) and that group's weight scales multiplied by it: exact in floats,
our codes untouched (power_of_two_smoothing). down_proj and the lm_head (and any linear whose input
no producer can rescale) are split along K into one 8da4w linear per bin of input groups of similar
range, summed (range_bins): an int8 range per token and bin.

Parity: 8-bit activations make the artifact inexact, so export derives its bounds before lowering
from an eager simulation of the same arithmetic (parity.derive_bounds over simulation_of) and records them, with their
basis, in the manifest, where verify reads them. f32 stays near-exact.
Facts: torch.export(strict=True) under no_grad, T as a Dim; the LLM ops need
`import executorch.extension.llm.custom_ops.custom_ops` at export and in the runtime.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckFailed, EdgeSLMError
from .base import ExportContext, Runner, Target

PROGRAM = "model.pte"
WEIGHTS = "model.ptd"  # ExecuTorch's program-data separation: every constant, delegated or not


# ---------------------------------------------------------------- int4 modules


RANGE_RATIO = 2.0
MAX_BINS = 6


def torchao_int4_weight(module, groups: torch.Tensor, in_gain: torch.Tensor | None = None,
                        out_gain: torch.Tensor | None = None) -> torch.Tensor:
    """The input groups `groups` of our packed int4 (Int4Linear / Int4Embedding, symmetric) ->
    a torchao 8da4w weight tensor [N, len(groups) * G]: our codes, our scales times the powers of
    two in_gain [K/G] (per input group) and out_gain [N] (per output row), which multiply exactly."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    from ..kernels.int4_matmul import dequantize_int4, unpack_int4

    n, g = module.out_features, module.group_size
    qweight = module.qweight.view(n, -1, g // 2)[:, groups].reshape(n, -1)  # a group's bytes are contiguous
    scales = module.scales[:, groups]
    codes = unpack_int4(qweight).to(torch.int16) - 8  # -8..7, W = code * scale
    # a zero scale (an all-zero group, e.g. Gemma's padding row, in checkpoints written before
    # schemes.int4.scale_grid clamped it) makes XNNPACK refuse the program at load: the same zeros as
    # code 0 with the smallest fp16 scale
    dead = (scales == 0).repeat_interleave(g, dim=1)
    codes = torch.where(dead, torch.zeros_like(codes), codes)
    scales = torch.where(scales == 0, torch.full_like(scales, 2**-24), scales).float()
    gain = torch.ones(n, len(groups))
    if in_gain is not None:
        gain = gain * in_gain[groups][None, :]
    if out_gain is not None:
        gain = gain * out_gain[:, None]
    weight = IntxUnpackedToInt8Tensor(
        codes.to(torch.int8), scales * gain, torch.zeros_like(scales, dtype=torch.int8),
        torch.int4, (1, g), torch.float32,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    ours = dequantize_int4(qweight, module.scales[:, groups], None, g, torch.float32) * gain.repeat_interleave(g, 1)
    theirs = weight.dequantize()
    if not torch.equal(ours, theirs):
        raise CheckFailed(f"torchao int4 weight differs from ours by {float((ours - theirs).abs().max()):.3g}")
    return weight


def input_group_ranges(model, tokens: torch.Tensor) -> dict:
    """{int4 module: largest |input| per K group over `tokens` [S, T]}; the tied table's input is
    the final norm's output."""
    from ..ops import reference_only
    from ..schemes.base import QuantizedEmbedding, QuantizedLinear

    largest = {}

    def keep(module, x):
        a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).view(-1, module.group_size).amax(1)
        largest[module] = torch.maximum(largest[module], a) if module in largest else a

    handles = [m.register_forward_pre_hook(lambda mod, args: keep(mod, args[0]))
               for m in model.modules() if isinstance(m, QuantizedLinear) and not isinstance(m, QuantizedEmbedding)]
    if isinstance(model.embed_tokens, QuantizedEmbedding) and model.lm_head is None:
        handles.append(model.norm.register_forward_hook(lambda mod, args, out: keep(model.embed_tokens, out)))
    try:
        with torch.no_grad(), reference_only():
            for row in tokens:
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return largest


def range_bins(group_max: torch.Tensor) -> list[torch.Tensor]:
    """Group indices binned by range: bin b holds the groups RANGE_RATIO**b..**(b+1) below the largest."""
    ratio = (group_max.max() / group_max.clamp_min(1e-12)).clamp_min(1.0)
    bins = torch.floor(torch.log(ratio) / math.log(RANGE_RATIO)).clamp(max=MAX_BINS - 1)
    return [torch.nonzero(bins == b).flatten() for b in bins.unique()]


class Linear8da4w(nn.Module):
    """One 8da4w linear per bin of input groups (all groups in one bin without calibration), summed;
    in_gain / out_gain: the power-of-two smoothing of its input groups and output rows."""

    def __init__(self, m, bins: list[torch.Tensor] | None = None, in_gain: torch.Tensor | None = None,
                 out_gain: torch.Tensor | None = None):
        super().__init__()
        bins = bins or [torch.arange(m.in_features // m.group_size)]
        self.num_bins = len(bins)
        for i, groups in enumerate(bins):
            weight = torchao_int4_weight(m, groups, in_gain, out_gain)
            setattr(self, f"weight_{i}", nn.Parameter(weight, requires_grad=False))
            channels = (groups[:, None] * m.group_size + torch.arange(m.group_size)).flatten()
            self.register_buffer(f"channels_{i}", channels if len(bins) > 1 else None)
        self.bias = m.bias
        if m.bias is not None and out_gain is not None:
            self.bias = nn.Parameter(m.bias.detach() * out_gain.to(m.bias.dtype), requires_grad=False)

    def forward(self, x):
        if self.num_bins == 1:
            return nn.functional.linear(x, self.weight_0, self.bias)
        y = sum(nn.functional.linear(x.index_select(-1, getattr(self, f"channels_{i}")), getattr(self, f"weight_{i}"))
                for i in range(self.num_bins))
        return y if self.bias is None else y + self.bias


class Embedding8da4w(nn.Module):
    """The tied int4 table: project() is an 8da4w linear (one per input-group bin) and forward()
    gathers rows from the same bytes. Each bin's codes are kept packed exactly as XNNPACK
    serializes that bin's weight (code + 8, even element in the low nibble), so the program's
    weights file stores the table once (ExecuTorch's named data dedupes equal blobs)."""

    def __init__(self, m, bins: list[torch.Tensor] | None = None, in_gain: torch.Tensor | None = None):
        super().__init__()
        self.group, self.dim = m.group_size, m.in_features
        self.head = Linear8da4w(m, bins, in_gain)
        bins = bins or [torch.arange(m.in_features // m.group_size)]
        order = []
        for i, groups in enumerate(bins):
            weight = getattr(self.head, f"weight_{i}")
            self.register_buffer(f"codes_{i}", xnnpack_packed_int4(weight.qdata))
            self.register_buffer(f"scales_{i}", m.scales[:, groups].clone())  # ours: the gains are the head's
            channels = getattr(self.head, f"channels_{i}")
            order.append(channels if channels is not None else torch.arange(self.dim))
        # bins concatenated -> the table's channel order
        self.register_buffer("unpermute", torch.argsort(torch.cat(order)) if self.head.num_bins > 1 else None)

    def forward(self, ids):
        pieces = []
        for i in range(self.head.num_bins):
            rows = getattr(self, f"codes_{i}")[ids].float()  # [B, T, K_bin/2] bytes as floats: exact float unpacking
            high = torch.floor(rows / 16)
            low = rows - 16 * high
            codes = torch.stack((low, high), dim=-1).reshape(*ids.shape, -1, self.group)
            pieces.append(((codes - 8.0) * getattr(self, f"scales_{i}")[ids].float().unsqueeze(-1)).flatten(-2))
        w = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return w if self.unpermute is None else w.index_select(-1, self.unpermute)

    def project(self, h):
        return self.head(h)


def xnnpack_packed_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes -8..7 [N, K] -> uint8 [N, K/2] as XNNPACK's serializer packs 4-bit weights."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 1::2] << 4) | u[:, ::2]


def et_ready(model, calibration: torch.Tensor | None = None, progress=None):
    """Swaps our int4 modules for 8da4w ones. With calibration tokens, smooths the inputs of q/k/v,
    gate/up and o_proj (power_of_two_smoothing: one int8 range per token then) and splits the others
    (down_proj, the lm_head, any whose input could not be smoothed) by range_bins."""
    from ..qformat import map_quantized_modules
    from ..schemes.base import QuantizedEmbedding, QuantizedLinear

    ranges = input_group_ranges(model, calibration) if calibration is not None else {}
    in_gains, out_gains, norm_gains = power_of_two_smoothing(model, ranges)
    bins = {m: range_bins(r) for m, r in ranges.items() if m not in in_gains}
    layer_of = {m: name.split(".")[1] for name, m in model.named_modules()
                if name.startswith("layers.") and isinstance(m, QuantizedLinear)}
    done = set()

    def linear(m):
        layer = layer_of.get(m)
        if progress is not None and layer is not None and layer not in done:
            done.add(layer)
            progress(f"layer {int(layer) + 1}/{model.spec.num_layers}: int4 linears -> 8da4w weights")
        return Linear8da4w(m, bins.get(m), in_gains.get(m), out_gains.get(m))

    if progress is not None and any(isinstance(m, QuantizedEmbedding) for m in model.modules()):
        progress("int4 table -> gather + 8da4w lm_head")
    map_quantized_modules(model, linear, lambda m: Embedding8da4w(m, bins.get(m), in_gains.get(m)))
    norms = {id(n): gain for n, gain in norm_gains.items()}
    return for_xnnpack_partitions(model, norms)


SMOOTHING_EXPONENT = 0.5


def power_of_two(group_max: torch.Tensor) -> torch.Tensor:
    """2**round(log2 x**SMOOTHING_EXPONENT) per entry; 1 where x is 0 (a group that never carried a value)."""
    s = torch.exp2(torch.round(SMOOTHING_EXPONENT * torch.log2(group_max.clamp_min(1e-30))))
    return torch.where(group_max > 0, s, torch.ones_like(s))


def power_of_two_smoothing(model, ranges: dict) -> tuple[dict, dict, dict]:
    """Per input group g of an int4 linear inside a layer, a power of two s_g near the square root of
    its calibrated largest |x| (half the spread moves into the weights, as in SmoothQuant): the
    linear's input is divided by s_g where it is made and its weight scales multiplied by s_g, which
    is exact in floats (powers of two) and leaves our int4 codes as they are. Where the division happens:
      the norm feeding q/k/v or gate/up: its output scale (per channel);
      o_proj's input: v_proj's output rows (one s per kv head and group, shared by its query heads).
    A site of another shape (parallel residual, unfused projections, float linears) is left alone,
    and so are down_proj and the lm_head: on SmolLM2 their inputs keep range bins, which cost
    less perplexity there than smoothing (simulated: +0.01% against +0.27% with smoothed down_proj).
    Returns ({module: in_gain [K/G]}, {module: out_gain [N]}, {norm: gain [D]})."""
    from ..schemes.int4 import Int4Linear

    in_gains, out_gains, norm_gains = {}, {}, {}
    spec = model.spec

    def fused(owner, name):
        head = getattr(owner, name, None)
        return head.fused if isinstance(head, FusedHead) and isinstance(head.fused, Int4Linear) else None

    def smooth_norm(norm, m):
        if m is None or m not in ranges:
            return
        s = power_of_two(ranges[m])
        in_gains[m] = s
        norm_gains[norm] = (1.0 / s).repeat_interleave(m.group_size)

    def smooth_rows(producer, first: int, consumer, s_rows: torch.Tensor, s_groups: torch.Tensor):
        gain = out_gains.setdefault(producer, torch.ones(producer.out_features))
        gain[first : first + len(s_rows)] = 1.0 / s_rows
        in_gains[consumer] = s_groups

    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fused(attn, "q_proj"), fused(mlp, "gate_proj")
        if not spec.parallel_residual:
            smooth_norm(layer.attn_norm, qkv)
            smooth_norm(layer.mlp_norm, gate_up)
        o, d, g = attn.o_proj, attn.head_dim, getattr(attn.o_proj, "group_size", 0)
        if qkv is not None and isinstance(o, Int4Linear) and o in ranges and d % g == 0:
            per_head = ranges[o].view(attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, d // g)
            s_kv = power_of_two(per_head.amax(1))  # [KV, D/G]: query heads h of kv head h // (H/KV)
            s_o = s_kv[:, None, :].expand_as(per_head).reshape(-1)
            v_rows = attn.num_heads * d + attn.num_kv_heads * d  # after q's and k's rows
            smooth_rows(qkv, v_rows, o, s_kv.repeat_interleave(g, -1).reshape(-1), s_o)
    return in_gains, out_gains, norm_gains


class RmsNormLinearMean(nn.Module):
    """An RMSNorm whose mean of squares is a linear by a constant 1/D row. XNNPACK delegates linears
    over a dynamic length but mean.dim only as a 4-D spatial pool, so the plain norm leaves a
    portable mean between two XNNPACK partitions twice per layer; this one keeps each layer's
    norms inside the partitions around them."""

    def __init__(self, norm, gain: torch.Tensor | None = None):
        super().__init__()
        self.eps = norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim))
        # the output scale per channel (Gemma's 1 + weight), times the smoothing gain (powers of two:
        # y * (scale * gain) rounds as (y * scale) * gain)
        scale = norm.weight.detach().float() + (1.0 if norm.kind == "rms_gemma" else 0.0)
        self.register_buffer("scale", scale if gain is None else scale * gain)

    @property
    def weight(self):  # the decoder casts the embedding to its final norm's weight dtype
        return self.scale

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(nn.functional.linear(x32 * x32, self.mean_row) + self.eps)
        return (y * self.scale).to(x.dtype)


class RotateHalfLinear(nn.Module):
    """rotate_half as a linear by a constant signed permutation (exact: one +-1 term per output).
    XNNPACK delegates it over a dynamic length; the cat of two slices it replaces is portable and
    splits the partition around each layer's rope."""

    def __init__(self, dim: int):
        super().__init__()
        half, rows = dim // 2, torch.arange(dim // 2)
        rotation = torch.zeros(dim, dim)
        rotation[rows, rows + half] = -1.0  # out[i] = -x[i + half]
        rotation[rows + half, rows] = 1.0  # out[i + half] = x[i]
        self.register_buffer("rotation", rotation)

    def forward(self, x):
        return nn.functional.linear(x, self.rotation)


def for_xnnpack_partitions(model, norm_gains: dict | None = None):
    """In place, the same function in ops XNNPACK delegates over a dynamic length: every RMSNorm
    (layer norms stay) -> RmsNormLinearMean (with its smoothing gain from norm_gains, keyed by the
    norm's id), every attention's rotate_half -> RotateHalfLinear."""
    from ..model import Norm, RotateHalf

    norm_gains = norm_gains or {}
    for name, mod in list(model.named_modules()):
        *path, attr = name.split(".")
        parent = model.get_submodule(".".join(path))
        if isinstance(mod, Norm) and mod.kind != "layer":
            setattr(parent, attr, RmsNormLinearMean(mod, norm_gains.get(id(mod))))
        elif isinstance(mod, RotateHalf):
            setattr(parent, attr, RotateHalfLinear(model.spec.rotary_dim))
    return model


def calibration_for(model, tokenizer, context: int) -> torch.Tensor:
    """Two windows of Brown train text (random ids for a model without a tokenizer)."""
    from ..quantizer import calibration_tokens

    length = min(512, context)
    if tokenizer is not None:
        try:
            return calibration_tokens(tokenizer, samples=2, length=length)
        except EdgeSLMError:
            pass
    return torch.randint(0, model.spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- fused projections


class _Shared:
    """Holds the fused output between the projection that computes it and the ones that slice it."""

    out = None


class FusedHead(nn.Module):
    """Stands in for the first projection a layer calls (q_proj, gate_proj): runs the fused linear
    once and keeps its output for the projections called next with the same input."""

    def __init__(self, fused, width: int, shared: _Shared):
        super().__init__()
        self.fused, self.width, self.shared = fused, width, shared

    def forward(self, x):
        y = self.fused(x)
        self.shared.out = y
        return y[..., : self.width]


class FusedPart(nn.Module):
    """Stands in for a later projection (k_proj, v_proj, up_proj): its columns of the fused output."""

    def __init__(self, first: int, last: int, shared: _Shared):
        super().__init__()
        self.first, self.last, self.shared = first, last, shared

    def forward(self, x):
        return self.shared.out[..., self.first : self.last]


def _fused_module(parts):
    """One Int4Linear (or float Linear) whose output rows are the parts' rows, in order; None when
    the parts differ in kind or layout."""
    from ..model import Linear
    from ..schemes.int4 import Int4Linear

    kinds = {type(p) for p in parts}
    if len(kinds) != 1 or len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return None
    kind = kinds.pop()
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    n = sum(p.out_features for p in parts)
    if kind is Int4Linear:
        if len({p.group_size for p in parts}) != 1 or any(p.zeros is not None for p in parts):
            return None
        fused = Int4Linear(parts[0].in_features, n, parts[0].group_size, True, bias=bias is not None)
        fused.qweight = torch.cat([p.qweight for p in parts])
        fused.scales = torch.cat([p.scales for p in parts])
    elif kind is Linear:
        fused = Linear(parts[0].in_features, n, bias is not None)
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    else:
        return None
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_projections(model) -> int:
    """q/k/v and gate/up share their input: each group becomes one linear (one GEMM, one int8 range
    per token and bin, one calibration of its input ranges). Returns how many groups were fused."""
    count = 0
    for layer in model.layers:
        for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            parts = [getattr(owner, n) for n in names]
            fused = _fused_module(parts)
            if fused is None:
                continue
            shared = _Shared()
            setattr(owner, names[0], FusedHead(fused, parts[0].out_features, shared))
            first = parts[0].out_features
            for name, part in zip(names[1:], parts[1:]):
                setattr(owner, name, FusedPart(first, first + part.out_features, shared))
                first += part.out_features
            count += 1
    return count


# ---------------------------------------------------------------- parity bounds of 8-bit activations


def simulation_of(prepared):
    """parity.derive_bounds' simulate(): the model already prepared for lowering (fused projections,
    8da4w linears with the artifact's range bins), run eagerly. torchao computes each 8da4w linear
    as XNNPACK's qd8 does (each row of the input rounded to int8 with one asymmetric range per token
    and bin, times the same int4 codes), so this is the artifact's arithmetic in PyTorch."""

    @contextlib.contextmanager
    def simulate(_reference):
        yield prepared

    return simulate


# ---------------------------------------------------------------- the program


class LlmProgram(nn.Module):
    """ExecuTorch's LLM-runner method: forward(tokens [1, T], input_pos [1]) -> logits [1, 1, V] of
    the last position (what the runner samples from, and what ExecuTorch's own llm export emits
    unless asked for full logits: a prefill runs the lm_head once), T dynamic in 1..max_seq_len;
    the KV cache lives in the swapped-in attention modules' buffers."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, input_pos):
        logits, _ = self.decoder(tokens, input_pos[0], None, last_only=True)
        return logits


def llm_metadata(model, tokenizer, context: int, max_seq_len: int, llm_ops: bool) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (extension/llm/runner: llm_runner_helper)."""
    spec = model.spec
    meta = {"get_max_seq_len": max_seq_len, "get_max_context_len": context, "get_vocab_size": spec.vocab_size,
            "get_n_layers": spec.num_layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": llm_ops,
            "enable_dynamic_shape": True}
    hf = getattr(model, "hf_config", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = bos if bos is not None else getattr(hf, "bos_token_id", None)
    eos = []
    for source in (getattr(hf, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        for e in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(e, int) and 0 <= e < spec.vocab_size and e not in eos:
                eos.append(e)
    if isinstance(bos, int) and 0 <= bos < spec.vocab_size:
        meta["get_bos_id"] = bos
    if eos:
        meta["get_eos_ids"] = eos
    return meta


def _say(message: str):
    import sys

    print(f"executorch export: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def partition_progress(say):
    """Reports XNNPACK's compilation of each partition (its preprocess), where lowering spends its
    time: `to_edge_transform_and_lower` itself is one call that says nothing for minutes. ExecuTorch
    has no progress hook, so XnnpackBackend's preprocess_multimethod (which learns the partition
    count) and preprocess are wrapped for the duration of the block and restored after it."""
    import time

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    own = {k: XnnpackBackend.__dict__[k] for k in ("preprocess", "preprocess_multimethod") if k in XnnpackBackend.__dict__}
    compile_one, compile_all = XnnpackBackend.preprocess, XnnpackBackend.preprocess_multimethod.__func__
    state = {"done": 0, "total": 0, "start": time.perf_counter()}

    def preprocess_multimethod(cls, programs, specs):
        state["total"] = sum(len(v) for v in programs.values())
        say(f"compiling {state['total']} XNNPACK partitions")
        return compile_all(cls, programs, specs)

    def preprocess(program, specs):
        result = compile_one(program, specs)
        state["done"] += 1
        say(f"XNNPACK partition {state['done']}/{state['total'] or '?'} compiled "
            f"({time.perf_counter() - state['start']:.0f} s)")
        return result

    XnnpackBackend.preprocess = staticmethod(preprocess)
    XnnpackBackend.preprocess_multimethod = classmethod(preprocess_multimethod)
    try:
        yield
    finally:
        for k in ("preprocess", "preprocess_multimethod"):
            if k in own:
                setattr(XnnpackBackend, k, own[k])
            else:
                delattr(XnnpackBackend, k)


WEIGHTS_TAG = WEIGHTS.removesuffix(".ptd")  # ExecuTorch names the data file after the tag


def weights_to_data_file(gm):
    """A transform pass: every graph input that holds a constant goes to the WEIGHTS file, XNNPACK's
    packed weights included (the partitioner reads the tag from node.meta["custom"]), so that equal
    blobs -- the tied table's codes, gathered by the embedding and multiplied by the lm_head --
    are stored once. The tag is harmless on the user inputs and the mutable KV buffers."""
    from executorch.exir.pass_base import PassResult

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG
    return PassResult(gm, True)


def tied_table_stored_once(model, weights_file: Path) -> str | None:
    """For a tied int4 table, checks the written data file: the embedding's packed codes of each bin
    (named by their FQN) and XNNPACK's lm_head blob of that bin (named by the blob's sha256) are one
    segment of the file."""
    import hashlib

    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorConfig, FlatTensorSerializer

    table = getattr(model, "embed_tokens", None)
    if not isinstance(table, Embedding8da4w):
        return None
    named = FlatTensorSerializer(FlatTensorConfig()).deserialize(weights_file.read_bytes()).named_data
    for i in range(table.head.num_bins):
        codes = getattr(table, f"codes_{i}").contiguous()
        blob = named.get(hashlib.sha256(codes.numpy().tobytes()).hexdigest())
        gathered = [e for k, e in named.items() if k.endswith(f"embed_tokens.codes_{i}")]
        if blob is None or len(gathered) != 1 or gathered[0].buffer_index != blob.buffer_index:
            raise CheckFailed(f"{weights_file.name} holds the tied table's bin {i} twice: the embedding's codes are "
                              "not XNNPACK's lm_head blob")
    return f"stored once: the embedding gathers the lm_head's XNNPACK blob ({table.head.num_bins} bin(s))"


class ExecuTorchTarget(Target):
    name = "executorch"
    description = ("ExecuTorch .pte (XNNPACK) for ExecuTorch's LLM runner: forward(tokens, input_pos) over a KV cache in "
                   "mutable buffers, llama::custom_sdpa where the attention allows; int4 as 8da4w")
    artifact_suffix = PROGRAM

    def unavailable_reason(self):
        try:
            import executorch.runtime  # noqa: F401
            import torchao  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed (pip install executorch==1.5.1 torchao==0.18.0)"
        return None

    def unsupported_reason(self, model, scheme):
        reason = scheme.target_reason("executorch")
        if reason:
            return reason
        if not scheme.quantized and scheme.float_dtype != "float32":
            return f"the executorch target exports f32 or int4; not {scheme.name}"
        return None

    def parity_bounds(self, scheme) -> dict:
        bounds = super().parity_bounds(scheme)
        if not scheme.quantized:
            bounds["max_abs_logit"] = 1e-3  # XNNPACK's fp32 GEMMs reassociate sums
        return bounds

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        import time

        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass

        from ..ops import reference_only
        from .executorch_attention import swap_in_program_attention

        t0 = time.perf_counter()
        model = model.eval()  # no .float(): it would widen the fp16 embedding scales
        context = ctx.context_length
        max_seq_len = min(context, max(ctx.prefill_chunk, 128))
        reference = copy.deepcopy(model) if scheme.quantized else None  # the simulation below replaces modules
        fused = fuse_projections(model)
        calibration = calibration_for(model, ctx.tokenizer, context) if scheme.quantized else None
        if calibration is not None:
            _say(f"calibrating input ranges over {calibration.numel()} tokens")
        model = et_ready(model, calibration, progress=_say)
        bounds = None
        if reference is not None:
            from ..parity import derive_bounds

            bounds = derive_bounds(reference, simulation_of(model), ctx.tokenizer, context,
                                   "XNNPACK 8da4w: each linear's input rounded to int8 per token and range bin "
                                   "(qd8), times the reference's int4 codes; simulated by torchao's eager 8da4w",
                                   reference_key=ctx.reference or None)
            del reference
            _say(f"parity bounds from the 8da4w simulation: max |logit diff| {bounds['max_abs_logit']:.3g}")
        bins_per_linear = [m.num_bins for m in model.modules() if isinstance(m, Linear8da4w)]
        kinds = swap_in_program_attention(model, context)
        llm_ops = any("custom_sdpa" in k for k in kinds)
        for kind, layers in kinds.items():
            _say(f"layers {layers}: {kind}")
        program_module = LlmProgram(model).eval()
        seq = torch.export.Dim("seq", min=1, max=max_seq_len)
        example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        metadata = llm_metadata(model, ctx.tokenizer, context, max_seq_len, llm_ops)
        with torch.no_grad(), reference_only():
            _say("torch.export of forward(tokens [1, 1..%d], input_pos [1])" % max_seq_len)
            exported = torch.export.export(program_module, example, dynamic_shapes=({1: seq}, None), strict=True)
            for m in model.modules():  # the traced fused outputs are not state
                if isinstance(m, FusedHead):
                    m.shared.out = None
            _say(f"exported in {time.perf_counter() - t0:.0f} s; lowering forward to XNNPACK")
            with partition_progress(_say):
                edge = to_edge_transform_and_lower(exported, transform_passes=[weights_to_data_file],
                                                   partitioner=[XnnpackPartitioner()], constant_methods=metadata)
            _say(f"lowered in {time.perf_counter() - t0:.0f} s; emitting the program")
            program = edge.to_executorch(ExecutorchBackendConfig(
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False), emit_mutable_buffer_names=True,
                external_constants=lambda node: WEIGHTS_TAG))
        with open(out / PROGRAM, "wb") as f:
            program.write_to_file(f)
        program.write_tensor_data_to_file(str(out))
        if not (out / WEIGHTS).is_file():
            raise CheckFailed(f"ExecuTorch wrote no {WEIGHTS} beside {PROGRAM}")
        tied = tied_table_stored_once(model, out / WEIGHTS)
        sizes = {f: (out / f).stat().st_size for f in (PROGRAM, WEIGHTS)}
        _say(f"wrote {PROGRAM} ({sizes[PROGRAM] / 1e6:.2f} MB) + {WEIGHTS} ({sizes[WEIGHTS] / 1e6:.1f} MB) "
             f"in {time.perf_counter() - t0:.0f} s")
        gm = edge.exported_program("forward").graph_module
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        lowering = {"forward": {
            "delegate_calls": sum("executorch_call_delegate" in str(n.target) for n in calls),
            "portable_ops": sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                                    for n in calls if "executorch_call_delegate" not in str(n.target)
                                    and "getitem" not in str(n.target)})}}
        fields = {"program": PROGRAM, "weights": WEIGHTS, "methods": ["forward", *sorted(metadata)],
                  "llm_metadata": metadata,
                  "max_seq_len": max_seq_len, "backend": "XNNPACK", "fused_projections": fused,
                  "attention": {k: v for k, v in kinds.items()}, "lowering": lowering,
                  "export_seconds": round(time.perf_counter() - t0, 1)}
        if ctx.tokenizer is not None:
            fields["tokenizer_file"] = "tokenizer/tokenizer.json"  # written by the export driver
        if bounds is not None:
            fields["parity_bounds"] = bounds
        if tied is not None:
            fields["tied_table"] = tied
        if bins_per_linear:
            fields["activation_ranges"] = {
                "rule": f"input groups binned by calibration |x| max, ratio {RANGE_RATIO:g}, at most {MAX_BINS} per linear",
                "linears": len(bins_per_linear), "int8_ranges_per_token": sum(bins_per_linear)}
        return fields

    def load(self, folder: Path, manifest: dict) -> Runner:
        return ExecuTorchRunner(Path(folder), manifest)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        return {"lowering": manifest.get("lowering"), "attention": manifest.get("attention"),
                "llm_metadata": manifest.get("llm_metadata"), "weights": manifest.get("weights"),
                "tied_table": manifest.get("tied_table")}


REQUIRED_METHODS = ("forward", "get_max_seq_len", "get_max_context_len", "get_vocab_size", "use_kv_cache",
                    "enable_dynamic_shape")


def load_runtime_ops():
    """The kernels a program of this target may call besides the runtime's portable ones:
    llama::update_cache / custom_sdpa and the quantized_decomposed ops."""
    from .executorch_attention import load_llm_ops

    load_llm_ops()
    try:
        import executorch.kernels.quantized  # noqa: F401
    except Exception:  # noqa: BLE001 - a program that needs them then fails to load, with its own message
        pass


class ExecuTorchRunner(Runner):
    """Drives the program as ExecuTorch's LLM runner does: forward over chunks of at most
    get_max_seq_len tokens at consecutive positions, from position 0 for a new sequence. The
    program returns the last position's logits, so scoring a window feeds it one token per call."""

    score_chunk = 1

    def __init__(self, folder: Path, manifest: dict):
        from importlib import metadata

        from executorch.runtime import Runtime

        load_runtime_ops()
        self.runtime = f"executorch {metadata.version('executorch')} (XNNPACK)"
        path = folder / manifest["program"]
        try:
            weights = manifest.get("weights")
            self.program = Runtime.get().load_program(str(path), data_path=str(folder / weights) if weights else None)
            names = set(self.program.method_names)
        except Exception as e:  # a damaged program must read as one line
            raise EdgeSLMError(f"executorch cannot load {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        missing = [m for m in REQUIRED_METHODS if m not in names]
        if missing:
            raise CheckFailed(f"{path.name} lacks the method(s) ExecuTorch's LLM runner needs: {', '.join(missing)}")
        self.metadata = {}
        for name in sorted(names - {"forward"}):
            values = self.program.load_method(name).execute([])
            values = [v.item() if torch.is_tensor(v) else v for v in values]
            self.metadata[name] = values if name == "get_eos_ids" else values[0]
        for name, want in (manifest.get("llm_metadata") or {}).items():
            got = self.metadata.get(name)
            if got != want and not (isinstance(want, bool) and got == int(want)):
                raise CheckFailed(f"{path.name}: constant method {name} returns {got!r}, the manifest says {want!r}")
        self.max_seq_len = int(self.metadata["get_max_seq_len"])
        self.context = int(self.metadata["get_max_context_len"])
        try:
            self.forward = self.program.load_method("forward")
        except Exception as e:  # noqa: BLE001
            raise EdgeSLMError(f"executorch cannot load {path.name}'s forward: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.next_pos = 0

    def reset(self):
        self.next_pos = 0  # the cache needs no clearing: positions past input_pos + T are never attended

    def _run(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if start != self.next_pos and start != 0:
            raise EdgeSLMError(f"positions must follow on: expected {self.next_pos}, got {start}")
        if start + tokens.shape[1] > self.context:
            raise EdgeSLMError(f"{start + tokens.shape[1]} tokens exceed the artifact's context of {self.context} "
                               f"(get_max_context_len)")
        out = self.forward.execute([tokens.long().contiguous(), torch.tensor([start], dtype=torch.long)])[0]
        self.next_pos = start + tokens.shape[1]
        return out

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        for i in range(0, tokens.shape[1], self.max_seq_len):
            logits = self._run(tokens[:, i : i + self.max_seq_len], start + i)
        return logits[:, -1:].clone()

    def decode(self, token: int, pos: int) -> torch.Tensor:
        return self._run(torch.tensor([[token]], dtype=torch.long), pos)[0, -1].clone()


TARGET = ExecuTorchTarget()
