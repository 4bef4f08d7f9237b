"""The WebLLM model library: module construction, the `_metadata` record, and a host-CPU build of
the same module driven the way the engine drives it (for numeric checks without a browser)."""

from __future__ import annotations

import numpy as np

from .relax_model import export_params
from .webllm_model import WebLLMDecoder, attach_metadata

PAGE_SIZE = 16


def model_type(spec) -> str:
    return spec.family


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
    sampling.attach_sampling(bb, gpu)
    mod = bb.finalize()
    meta = {
        "model_type": model_type(decoder.spec),
        "kv_state_kind": "kv_cache",
        "context_window_size": context,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": prefill_chunk,
        "max_batch_size": 1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "params": [{"name": n, "shape": list(params[n].shape), "dtype": str(params[n].dtype)} for n in names],
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
