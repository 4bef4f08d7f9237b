// The in-browser half of edgeslm's WebGPU runner. Loads an artifact folder (served under
// /artifact/) with @mlc-ai/web-runtime (tvmjs) and exposes window.edgeslm, which the node
// driver calls through playwright. Every entry point returns plain JSON; logits travel as
// base64 little-endian float32.
"use strict";

function log(msg) {
  document.getElementById("log").textContent += msg + "\n";
}

function toBase64(f32) {
  const bytes = new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
  let s = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(s);
}

class Problem extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

const state = { tvm: null, vm: null, dev: null, params: null, cache: null, past: 0, meta: null };

async function load() {
  const t0 = performance.now();
  const meta = await (await fetch("/artifact/webgpu.json")).json();
  state.meta = meta;
  if (!navigator.gpu) throw new Problem("no_webgpu", "this browser exposes no navigator.gpu");
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Problem("no_adapter", "no WebGPU adapter");
  const info = adapter.info || {};
  const adapterFacts = {
    vendor: info.vendor || "", architecture: info.architecture || "", description: info.description || "",
    isFallbackAdapter: !!(info.isFallbackAdapter || adapter.isFallbackAdapter),
    features: Array.from(adapter.features).sort(),
    maxBufferSize: adapter.limits.maxBufferSize,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
  };
  for (const f of meta.features) {
    if (!adapter.features.has(f)) {
      throw new Problem("missing_feature", `the WebGPU adapter (${adapterFacts.vendor || "unknown"} ${adapterFacts.architecture}) lacks the '${f}' feature this artifact needs`);
    }
  }
  const limit = Math.min(adapter.limits.maxStorageBufferBindingSize, adapter.limits.maxBufferSize);
  if (meta.largest_buffer_bytes > limit) {
    throw new Problem("buffer_limit", `the artifact's largest buffer is ${meta.largest_buffer_bytes} bytes, over this adapter's limit of ${limit} bytes`);
  }
  const gpu = await tvmjs.detectGPUDevice();
  const wasm = await (await fetch("/artifact/model.wasm")).arrayBuffer();
  const tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), log);
  tvm.initWebGPU(gpu.device);
  state.tvm = tvm;
  state.dev = tvm.webgpu();
  tvm.beginScope();
  state.vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(state.dev));
  await tvm.fetchTensorCache(location.origin + "/artifact/", state.dev, "edgeslm", "cache");
  state.params = tvm.detachFromCurrentScope(tvm.getParamsFromCacheByName(meta.param_names));
  state.first = tvm.detachFromCurrentScope(state.vm.getFunction(meta.functions.first));
  state.step = tvm.detachFromCurrentScope(state.vm.getFunction(meta.functions.step));
  tvm.endScope();
  await state.dev.sync();
  return { adapter: adapterFacts, load_ms: performance.now() - t0 };
}

function resetCache() {
  if (state.cache) state.cache.dispose();
  state.cache = null;
  state.past = 0;
}

// Runs tokens at positions past.. and returns logits [T, V] on the CPU.
async function forward(tokens) {
  const tvm = state.tvm;
  const t0 = performance.now();
  tvm.beginScope();
  const ids = tvm.empty([1, tokens.length], "int32", tvm.cpu());
  ids.copyFrom(new Int32Array(tokens));
  const gpuIds = tvm.empty([1, tokens.length], "int32", state.dev);
  gpuIds.copyFrom(ids);
  const out = state.cache === null ? state.first(gpuIds, state.params) : state.step(gpuIds, state.cache, state.params);
  const logits = out.get(0);
  const cache = tvm.detachFromCurrentScope(out.get(1));
  const host = tvm.empty(logits.shape, "float32", tvm.cpu());
  host.copyFrom(logits);
  await state.dev.sync();
  const values = new Float32Array(host.toArray());
  tvm.endScope();
  if (state.cache) state.cache.dispose();
  state.cache = cache;
  state.past += tokens.length;
  return { values, ms: performance.now() - t0 };
}

function argmaxLast(values, vocab) {
  const off = values.length - vocab;
  let best = 0;
  for (let i = 1; i < vocab; i++) if (values[off + i] > values[off + best]) best = i;
  return best;
}

window.edgeslm = {
  ready: null,
  async reset() { resetCache(); return {}; },
  async prefill(tokens, start) {
    if (start !== state.past) throw new Problem("bad_position", `prefill at ${start} but the cache holds ${state.past} tokens`);
    const r = await forward(tokens);
    return { logits: toBase64(r.values), ms: r.ms };
  },
  // Greedy decoding entirely in the page: prefill, then steps-1 decodes; last-position logits.
  async generate(prompt, steps) {
    const vocab = state.meta.vocab_size;
    resetCache();
    const all = new Float32Array(steps * vocab);
    const tokens = [];
    let r = await forward(prompt);
    const prefillMs = r.ms;
    const decodeMs = [];
    for (let s = 0; s < steps; s++) {
      all.set(r.values.subarray(r.values.length - vocab), s * vocab);
      const next = argmaxLast(r.values, vocab);
      tokens.push(next);
      if (s + 1 < steps) {
        r = await forward([next]);
        decodeMs.push(r.ms);
      }
    }
    return { tokens, logits: toBase64(all), prefill_ms: prefillMs, decode_ms: decodeMs };
  },
};

window.edgeslm.ready = load().then(
  (facts) => ({ ok: true, ...facts }),
  (e) => ({ ok: false, kind: e.kind || "error", message: String(e && e.message ? e.message : e) }),
);
