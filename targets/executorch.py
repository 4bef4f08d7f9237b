"""ExecuTorch target: one .pte program lowered to XNNPACK, three methods over one static KV cache.

  prefill(tokens [1, C], start_pos) -> logits [1, C, V]   C = the prefill chunk
  decode(tokens [1, 1], start_pos)  -> logits [1, 1, V]
  reset(dummy [1])                  -> zeros the cache

The cache tensors are mutable buffers of the program (the decoder's own static cache, written in
place with index_copy_), shared by the three methods (MemoryPlanningPass(share_mutable_buffers)).
Sliding-window layers keep their `window`-slot ring; positions are derived from start_pos inside
the graph (model.ring_positions), so they stay correct past the window. A prompt is fed in full
chunks through prefill and its tail token by token through decode.

int4 (symmetric q4g{G}-*): 8-bit dynamic activations x OUR int4 weights. Each Int4Linear becomes
linears whose weights are torchao IntxUnpackedToInt8Tensors built from our codes and fp16 scales
(codes - 8 as int4 values, zero point 0, our scales), never re-quantized from float; export checks
that they dequantize to exactly our int4 weights. XNNPACK packs them into its 4-bit blockwise
kernels. The int4 embedding gathers rows of our packed table in plain ops; the tied lm_head is an
8da4w linear over the same codes (XNNPACK keeps its own packed copy: the table is stored twice).

Activation ranges: XNNPACK quantizes a linear's input with one int8 range per token, so a few
input groups with large activations wash out the rest (SmolLM2-135M q4g32-gptq: +2.9% Brown
perplexity over the int4 reference). Export therefore runs the int4 model over calibration text,
bins each linear's input groups by their largest |x| (groups within RANGE_RATIO of each other share
a bin, at most MAX_BINS bins) and splits the linear along K into one 8da4w linear per bin, summed:
the same int4 weights, an int8 range per token and bin. SmolLM2-135M q4g32-gptq, Brown test: the
.pte is +0.40% over the int4 reference on 2,048 tokens (one range: +2.95%); a simulation of XNNPACK's
qd8 (equal to the .pte on single linears) gives +0.30% on 8,192 tokens, and one range per group of 32,
the finest possible, +0.12%. The price is 656 linears for SmolLM2's 211 and a slow lowering.
Facts: torch.export(strict=True) under no_grad (strict=False turns the cache buffers into
constants and lowering fails); with the bins, lowering SmolLM2-135M takes ~20 minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckFailed, EdgeSLMError
from .base import ExportContext, Runner, Target

PROGRAM = "model.pte"
METHODS = ("prefill", "decode", "reset")


# ---------------------------------------------------------------- int4 modules


RANGE_RATIO = 2.0
MAX_BINS = 6


def torchao_int4_weight(module, groups: torch.Tensor) -> torch.Tensor:
    """The input groups `groups` of our packed int4 (Int4Linear / Int4Embedding, symmetric) ->
    a torchao 8da4w weight tensor [N, len(groups) * G]."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    from ..kernels.int4_matmul import dequantize_int4, unpack_int4

    n, g = module.out_features, module.group_size
    qweight = module.qweight.view(n, -1, g // 2)[:, groups].reshape(n, -1)  # a group's bytes are contiguous
    scales = module.scales[:, groups]
    codes = unpack_int4(qweight).to(torch.int16) - 8  # -8..7, W = code * scale
    # a zero scale (an all-zero group, e.g. Gemma's padding row, in checkpoints written before
    # qformat.scale_grid clamped it) makes XNNPACK refuse the program at load: the same zeros as
    # code 0 with the smallest fp16 scale
    dead = (scales == 0).repeat_interleave(g, dim=1)
    codes = torch.where(dead, torch.zeros_like(codes), codes)
    scales = torch.where(scales == 0, torch.full_like(scales, 2**-24), scales)
    weight = IntxUnpackedToInt8Tensor(
        codes.to(torch.int8), scales.float(), torch.zeros_like(scales, dtype=torch.int8),
        torch.int4, (1, g), torch.float32,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    ours = dequantize_int4(qweight, module.scales[:, groups], None, g, torch.float32)
    theirs = weight.dequantize()
    if not torch.equal(ours, theirs):
        raise CheckFailed(f"torchao int4 weight differs from ours by {float((ours - theirs).abs().max()):.3g}")
    return weight


def input_group_ranges(model, tokens: torch.Tensor) -> dict:
    """{int4 module: largest |input| per K group over `tokens` [S, T]}; the tied table's input is
    the final norm's output."""
    from ..ops import reference_only
    from ..qformat import Int4Embedding, Int4Linear

    largest = {}

    def keep(module, x):
        a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).view(-1, module.group_size).amax(1)
        largest[module] = torch.maximum(largest[module], a) if module in largest else a

    handles = [m.register_forward_pre_hook(lambda mod, args: keep(mod, args[0]))
               for m in model.modules() if type(m) is Int4Linear]
    if isinstance(model.embed_tokens, Int4Embedding) and model.lm_head is None:
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


class EtInt4Linear(nn.Module):
    """One 8da4w linear per bin of input groups (all groups in one bin without calibration), summed."""

    def __init__(self, m, bins: list[torch.Tensor] | None = None):
        super().__init__()
        bins = bins or [torch.arange(m.in_features // m.group_size)]
        self.num_bins = len(bins)
        for i, groups in enumerate(bins):
            setattr(self, f"weight_{i}", nn.Parameter(torchao_int4_weight(m, groups), requires_grad=False))
            channels = (groups[:, None] * m.group_size + torch.arange(m.group_size)).flatten()
            self.register_buffer(f"channels_{i}", channels if len(bins) > 1 else None)
        self.bias = m.bias

    def forward(self, x):
        if self.num_bins == 1:
            return nn.functional.linear(x, self.weight_0, self.bias)
        y = sum(nn.functional.linear(x.index_select(-1, getattr(self, f"channels_{i}")), getattr(self, f"weight_{i}"))
                for i in range(self.num_bins))
        return y if self.bias is None else y + self.bias


class EtInt4Embedding(nn.Module):
    """Row gather from our packed table (plain portable ops); project() is an 8da4w linear."""

    def __init__(self, m, bins: list[torch.Tensor] | None = None):
        super().__init__()
        self.group, self.dim = m.group_size, m.in_features
        self.register_buffer("qweight", m.qweight)
        self.register_buffer("scales", m.scales)
        self.head = EtInt4Linear(m, bins)

    def forward(self, ids):
        rows = self.qweight[ids].float()  # [B, T, K/2] bytes as floats: unpack with exact float math
        high = torch.floor(rows / 16)
        low = rows - 16 * high
        codes = torch.stack((low, high), dim=-1).reshape(*ids.shape, self.dim // self.group, self.group)
        w = (codes - 8.0) * self.scales[ids].float().unsqueeze(-1)
        return w.reshape(*ids.shape, self.dim)

    def project(self, h):
        return self.head(h)


def et_ready(model, calibration: torch.Tensor | None = None):
    """Swaps our int4 modules for 8da4w ones; with calibration tokens, each splits by range_bins."""
    from ..qformat import map_int4_modules

    ranges = input_group_ranges(model, calibration) if calibration is not None else {}
    bins = {m: range_bins(r) for m, r in ranges.items()}
    return map_int4_modules(model, lambda m: EtInt4Linear(m, bins.get(m)), lambda m: EtInt4Embedding(m, bins.get(m)))


def calibration_for(model, tokenizer, context: int) -> torch.Tensor:
    """Two windows of Brown train text (random ids for a model without a tokenizer)."""
    from ..quantize import calibration_tokens

    length = min(512, context)
    if tokenizer is not None:
        try:
            return calibration_tokens(tokenizer, samples=2, length=length)
        except EdgeSLMError:
            pass
    return torch.randint(0, model.spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the program's methods


class _CachedDecoder(nn.Module):
    """The decoder over a cache held in buffers (cache_0 .. cache_{2L-1}) and written in place."""

    def __init__(self, decoder, context: int):
        super().__init__()
        self.decoder = decoder
        decoder.inplace_cache = True
        cache = decoder.new_cache(1, context, dtype=torch.float32)
        self.n = len(cache)
        for i, c in enumerate(cache):
            self.register_buffer(f"cache_{i}", c)

    def forward(self, tokens, start_pos):
        cache = [getattr(self, f"cache_{i}") for i in range(self.n)]
        logits, _ = self.decoder(tokens, start_pos, cache)
        return logits


class _Reset(nn.Module):
    """Same buffer names as _CachedDecoder, so the shared mutable buffers line up."""

    def __init__(self, cached: _CachedDecoder):
        super().__init__()
        self.n = cached.n
        for i in range(cached.n):
            self.register_buffer(f"cache_{i}", getattr(cached, f"cache_{i}"))

    def forward(self, dummy):
        for i in range(self.n):
            getattr(self, f"cache_{i}").zero_()
        return dummy + 0


class ExecuTorchTarget(Target):
    name = "executorch"
    description = "ExecuTorch .pte (XNNPACK), prefill/decode/reset methods over a shared static KV cache; int4 as 8da4w"
    artifact_suffix = PROGRAM

    def unavailable_reason(self):
        try:
            import executorch.runtime  # noqa: F401
            import torchao  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed (pip install executorch==1.5.1 torchao==0.18.0)"
        return None

    def unsupported_reason(self, model, scheme):
        if scheme.quantized and (scheme.bits != 4 or not scheme.symmetric):
            return (f"the executorch target maps symmetric int4 (XNNPACK's 4-bit blockwise kernels have no zero "
                    f"points) and f32; not {scheme.name}")
        if not scheme.quantized and scheme.float_dtype != "float32":
            return f"the executorch target exports f32 or int4; not {scheme.name}"
        return None

    def parity_bounds(self, scheme) -> dict:
        bounds = super().parity_bounds(scheme)
        if not scheme.quantized:
            bounds["max_abs_logit"] = 1e-3  # XNNPACK's fp32 GEMMs reassociate sums
        return bounds

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from tqdm.auto import tqdm

        from ..ops import reference_only

        model = model.eval()  # no .float(): it would widen the fp16 embedding scales
        calibration = calibration_for(model, ctx.tokenizer, ctx.context_length) if scheme.quantized else None
        model = et_ready(model, calibration)
        bins_per_linear = [m.num_bins for m in model.modules() if isinstance(m, EtInt4Linear)]
        cached = _CachedDecoder(model, ctx.context_length).eval()
        reset = _Reset(cached).eval()
        chunk = min(ctx.prefill_chunk, ctx.context_length)
        examples = {
            "prefill": (cached, (torch.zeros(1, chunk, dtype=torch.long), torch.tensor(0, dtype=torch.long))),
            "decode": (cached, (torch.zeros(1, 1, dtype=torch.long), torch.tensor(0, dtype=torch.long))),
            "reset": (reset, (torch.zeros(1),)),
        }
        steps = tqdm(total=len(examples) + 2, desc="executorch export", unit="step")
        programs = {}
        with torch.no_grad(), reference_only():
            for name, (module, args) in examples.items():
                programs[name] = torch.export.export(module, args, strict=True)
                steps.update()
            # one partitioner takes the 8da4w linears and the float ops together: large partitions,
            # few delegate calls, and the fastest lowering measured (SmolLM2's first 4 layers with
            # range bins: 45 s, against 61 s with ExecuTorch's llama recipe of a per-linear
            # dynamically quantized partitioner first, 98 s fully per-op). The load failure that
            # once seemed to need per-linear partitions was a zero scale (qformat.scale_grid).
            edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
            steps.update()
            program = edge.to_executorch(ExecutorchBackendConfig(
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                emit_mutable_buffer_names=True))
            steps.update()
        steps.close()
        with open(out / PROGRAM, "wb") as f:
            program.write_to_file(f)
        delegated = {}
        for name in ("prefill", "decode"):
            gm = edge.exported_program(name).graph_module
            calls = [n for n in gm.graph.nodes if n.op == "call_function"]
            delegated[name] = {"delegate_calls": sum("executorch_call_delegate" in str(n.target) for n in calls),
                               "portable_ops": sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                                                       for n in calls if "executorch_call_delegate" not in str(n.target)
                                                       and "getitem" not in str(n.target)})}
        return {"program": PROGRAM, "methods": list(METHODS), "prefill_chunk": chunk, "backend": "XNNPACK",
                "cache_shapes": [list(getattr(cached, f"cache_{i}").shape) for i in range(cached.n)],
                **({"activation_ranges": {"rule": f"input groups binned by calibration |x| max, ratio {RANGE_RATIO:g}, "
                                                  f"at most {MAX_BINS} per linear",
                                          "linears": len(bins_per_linear), "int8_ranges_per_token": sum(bins_per_linear)}} if bins_per_linear else {}),
                "lowering": delegated}

    def load(self, folder: Path, manifest: dict) -> Runner:
        return ExecuTorchRunner(Path(folder), manifest)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        return {"lowering": manifest.get("lowering")}


class ExecuTorchRunner(Runner):
    def __init__(self, folder: Path, manifest: dict):
        from importlib import metadata

        from executorch.runtime import Runtime

        self.runtime = f"executorch {metadata.version('executorch')} (XNNPACK)"
        try:
            self.program = Runtime.get().load_program(str(folder / manifest["program"]))
            self.methods = {m: self.program.load_method(m) for m in METHODS}
        except Exception as e:  # a damaged program must read as one line
            raise EdgeSLMError(f"executorch cannot load {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.chunk = manifest["prefill_chunk"]
        self.reset()

    def reset(self):
        self.methods["reset"].execute([torch.zeros(1)])

    def _run(self, method, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.methods[method].execute([tokens.contiguous(), torch.tensor(start, dtype=torch.long)])[0]

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        tokens = tokens.long()
        t, pieces, pos = tokens.shape[1], [], 0
        while t - pos >= self.chunk:
            pieces.append(self._run("prefill", tokens[:, pos : pos + self.chunk], start + pos).clone())
            pos += self.chunk
        while pos < t:
            pieces.append(self._run("decode", tokens[:, pos : pos + 1], start + pos).clone())
            pos += 1
        return torch.cat(pieces, dim=1)

    def decode(self, token: int, pos: int) -> torch.Tensor:
        return self._run("decode", torch.tensor([[token]], dtype=torch.long), pos)[0, -1].clone()


TARGET = ExecuTorchTarget()
