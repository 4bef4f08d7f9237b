"""ONNX target: two graphs over one weights file, run by onnxruntime.

  prefill.onnx   tokens [1, C] (C = the prefill chunk), start_pos, past KV -> logits [1, C, V], present KV
  decode.onnx    tokens [1, 1], start_pos, past KV -> logits [1, 1, V], present KV
  weights.data   every initializer once (both graphs point into it by offset: ONNX external data)

Both graphs are traces of the reference decoder (ops.reference_only) with static shapes: the KV
cache is explicit (past.key.i / past.value.i in, present.* out); a sliding-window layer's cache is
its ring of `window` slots, and which position each slot holds is computed from start_pos inside
the graph (model.ring_positions), so it stays correct past the window. Prefill and decode are two
graphs because the decoder takes a different (static) path for a chunk than for one token at
local layers. A prompt is fed in full chunks, its tail token by token through decode.

int4 (q4g{G}[a]-*): every Int4Linear becomes com.microsoft::MatMulNBits whose B is our packed
qweight reshaped (our layout is MatMulNBits' bits=4 layout byte for byte), scales stay fp16 on
disk and are Cast to fp32 in the graph (onnxruntime folds the Cast when it loads the session),
asymmetric zero points are packed two per byte as MatMulNBits wants. The int4 embedding gathers
rows of the same packed initializer and unpacks them with plain ONNX ops; the tied lm_head is
MatMulNBits over that same initializer, so the table is stored once.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgeSLMError
from .base import ExportContext, Runner, Target

OPSET = 18
GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
WEIGHTS = "weights.data"


# ---------------------------------------------------------------- int4 modules for tracing


class _MatMulNBits(torch.autograd.Function):
    """x @ dequant(W).T; traced to com.microsoft::MatMulNBits by the legacy exporter's symbolic."""

    @staticmethod
    def forward(ctx, x, b, scales, zeros_packed, n, k, group):
        from ..kernels.int4_matmul import int4_matmul_reference

        zeros = None if zeros_packed is None else _unpack_zero_points(zeros_packed, k // group)
        return int4_matmul_reference(x, b.reshape(n, k // 2), scales, zeros, group)

    @staticmethod
    def symbolic(g, x, b, scales, zeros_packed, n, k, group):
        s = g.op("Cast", scales, to_i=1)  # fp16 on disk -> fp32 (MatMulNBits wants scales in A's type)
        s = g.op("Reshape", s, g.op("Constant", value_t=torch.tensor([-1], dtype=torch.long)))
        inputs = [x, b, s] if zeros_packed is None else [x, b, s, zeros_packed]
        return g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=4, block_size_i=group)


def _pack_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """uint8 [N, G] (0..15) -> uint8 [N, ceil(G/2)], two per byte, low nibble first (MatMulNBits)."""
    n, groups = zeros.shape
    if groups % 2:
        zeros = torch.cat((zeros, torch.zeros(n, 1, dtype=torch.uint8)), dim=1)
    return zeros[:, 0::2] | (zeros[:, 1::2] << 4)


def _unpack_zero_points(packed: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :groups]


class OnnxInt4Linear(nn.Module):
    def __init__(self, m):
        super().__init__()
        n, k, g = m.out_features, m.in_features, m.group_size
        self.n, self.k, self.group = n, k, g
        self.register_buffer("b", m.qweight.reshape(n, k // g, g // 2))
        self.register_buffer("scales", m.scales)
        self.register_buffer("zero_points", None if m.zeros is None else _pack_zero_points(m.zeros))
        self.bias = m.bias

    def forward(self, x):
        y = _MatMulNBits.apply(x, self.b, self.scales, self.zero_points, self.n, self.k, self.group)
        return y if self.bias is None else y + self.bias


class OnnxInt4Embedding(OnnxInt4Linear):
    """Gathers rows of the packed table and dequantizes them; project() is the tied lm_head."""

    def forward(self, ids):
        rows = self.b[ids]  # [B, T, K/G, G/2] uint8
        codes = torch.stack((rows & 0x0F, rows >> 4), dim=-1).reshape(*rows.shape[:-1], self.group)
        if self.zero_points is None:
            zero = torch.tensor(8.0)
        else:
            zero = _unpack_zero_points(self.zero_points[ids.flatten()], self.k // self.group)
            zero = zero.view(*ids.shape, -1, 1).float()
        w = (codes.float() - zero) * self.scales[ids].float().unsqueeze(-1)
        return w.reshape(*ids.shape, self.k)

    def project(self, h):
        return super().forward(h)


def onnx_ready(model):
    """Swaps int4 modules for the traceable ones above (in place). Int8 is not mapped yet."""
    from ..qformat import map_int4_modules

    return map_int4_modules(model, OnnxInt4Linear, OnnxInt4Embedding)


class _Step(nn.Module):
    """(tokens, start_pos, *past) -> (logits, *present): the decoder with an explicit cache."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, start_pos, *past):
        logits, present = self.decoder(tokens, start_pos, list(past))
        return (logits, *present)


def cache_names(num_layers: int) -> list[str]:
    return [f"{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def _trace(step, tokens_len: int, cache) -> "onnx.ModelProto":
    import warnings

    import onnx

    names = cache_names(len(cache) // 2)
    args = (torch.zeros(1, tokens_len, dtype=torch.long), torch.tensor(0, dtype=torch.long), *cache)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints: shapes are static on purpose
        torch.onnx.export(
            step, args, buf, dynamo=False, opset_version=OPSET, do_constant_folding=False,
            input_names=["tokens", "start_pos", *[f"past.{n}" for n in names]],
            output_names=["logits", *[f"present.{n}" for n in names]],
            custom_opsets={"com.microsoft": 1},
        )
    return onnx.load_from_string(buf.getvalue())


def _share_weights(models: dict, folder: Path) -> dict:
    """Writes each distinct initializer once into weights.data; every graph points at it."""
    from onnx import numpy_helper

    offsets, stored = {}, 0
    with open(folder / WEIGHTS, "wb") as f:
        for proto in models.values():
            for init in proto.graph.initializer:
                data = numpy_helper.to_array(init).tobytes()
                key = (init.data_type, tuple(init.dims), hashlib.sha256(data).hexdigest())
                if key not in offsets:
                    pad = (-stored) % 64  # aligned, so onnxruntime can map tensors in place
                    f.write(b"\0" * pad)
                    stored += pad
                    offsets[key] = (stored, len(data))
                    f.write(data)
                    stored += len(data)
                offset, length = offsets[key]
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    init.ClearField(field)
                del init.external_data[:]
                for key_, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key_, value
                init.data_location = 1  # EXTERNAL
    return {"weights_bytes": stored, "distinct_initializers": len(offsets)}


# ---------------------------------------------------------------- the target


class OnnxTarget(Target):
    name = "onnx"
    description = "ONNX graphs (prefill + decode, explicit KV) for onnxruntime; int4 as MatMulNBits"
    artifact_suffix = "decode.onnx"

    def unavailable_reason(self):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed (pip install onnx onnxruntime)"
        return None

    def unsupported_reason(self, model, scheme):
        if scheme.quantized and scheme.bits != 4:
            return f"the onnx target maps int4 schemes and f32; {scheme.name} is not mapped yet"
        if not scheme.quantized and scheme.float_dtype != "float32":
            return f"the onnx target exports f32 (onnxruntime's CPU kernels lack many fp16 ops); not {scheme.name}"
        return None

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        import onnx

        from ..ops import reference_only

        # no model.float(): it would also widen the fp16 scales (0.0625 -> 0.125 bytes per weight)
        model = onnx_ready(model.eval())
        model.inplace_cache = False
        cache = model.new_cache(1, ctx.context_length)
        chunk = min(ctx.prefill_chunk, ctx.context_length)
        step = _Step(model).eval()
        with torch.no_grad(), reference_only():
            protos = {"prefill": _trace(step, chunk, cache), "decode": _trace(step, 1, cache)}
        facts = _share_weights(protos, out)
        for role, proto in protos.items():
            onnx.save_model(proto, str(out / GRAPHS[role]), save_as_external_data=False)
            onnx.checker.check_model(str(out / GRAPHS[role]))
        ops = sorted({n.op_type for n in protos["decode"].graph.node})
        return {
            "graphs": GRAPHS, "weights": WEIGHTS, "opset": OPSET, "prefill_chunk": chunk,
            "cache_shapes": [list(c.shape) for c in cache], "decode_ops": ops, **facts,
        }

    def load(self, folder: Path, manifest: dict) -> Runner:
        return OnnxRunner(Path(folder), manifest)

    def inspect(self, folder: Path, manifest: dict) -> dict:
        return {"decode_ops": manifest.get("decode_ops"), "opset": manifest.get("opset")}


class OnnxRunner(Runner):
    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        graphs = manifest["graphs"]
        try:
            self.sessions = {role: ort.InferenceSession(str(folder / graphs[role]), opts, providers=["CPUExecutionProvider"])
                             for role in ("prefill", "decode")}
        except Exception as e:  # a damaged graph must read as one line
            raise EdgeSLMError(f"onnxruntime cannot load {folder}: {str(e).splitlines()[0]}") from None
        self.chunk = manifest["prefill_chunk"]
        self.shapes = [tuple(s) for s in manifest["cache_shapes"]]
        self.past_names = [i.name for i in self.sessions["decode"].get_inputs()][2:]
        self.reset()

    def reset(self):
        self.cache = [np.zeros(s, np.float32) for s in self.shapes]

    def _run(self, role, tokens: np.ndarray, start: int) -> np.ndarray:
        feeds = {"tokens": tokens, "start_pos": np.array(start, dtype=np.int64)}
        feeds.update(zip(self.past_names, self.cache))
        out = self.sessions[role].run(None, feeds)
        self.cache = out[1:]
        return out[0]

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        ids = tokens.numpy().astype(np.int64)
        t, pieces, pos = ids.shape[1], [], 0
        while t - pos >= self.chunk:
            pieces.append(self._run("prefill", ids[:, pos : pos + self.chunk], start + pos))
            pos += self.chunk
        while pos < t:
            pieces.append(self._run("decode", ids[:, pos : pos + 1], start + pos))
            pos += 1
        return torch.from_numpy(np.concatenate(pieces, axis=1))

    def decode(self, token: int, pos: int) -> torch.Tensor:
        return torch.from_numpy(self._run("decode", np.array([[token]], dtype=np.int64), pos)[0, -1])


TARGET = OnnxTarget()
