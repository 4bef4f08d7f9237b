// The in-browser half of edgeslm's WebGPU runner. Loads an artifact folder (served under
// /artifact/) with @mlc-ai/web-runtime (tvmjs), drives its model library the way WebLLM's engine
// does (paged KV cache through the runtime's vm.builtin.kv_state_* functions), and exposes
// window.edgeslm, which the node driver calls through playwright. Every entry point returns plain
// JSON; logits travel as base64 little-endian float32.
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

const state = { tvm: null, vm: null, dev: null, params: null, kv: null, past: 0, meta: null, fn: {} };

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
  for (const [key, name] of Object.entries(meta.functions)) {
    state.fn[key] = tvm.detachFromCurrentScope(state.vm.getFunction(name));
  }
  for (const name of ["kv_state_clear", "kv_state_add_sequence", "kv_state_begin_forward", "kv_state_end_forward"]) {
    state.fn[name] = tvm.detachFromCurrentScope(tvm.getGlobalFunc("vm.builtin." + name));
  }
  // one sequence, the artifact's context, its prefill chunk, pages of 16, no runtime sliding window
  state.kv = tvm.detachFromCurrentScope(state.fn.create_cache(
    tvm.makeShapeTuple([1]), tvm.makeShapeTuple([meta.context_length]), tvm.makeShapeTuple([meta.prefill_chunk_size]),
    tvm.makeShapeTuple([meta.page_size]), tvm.makeShapeTuple([0])));
  tvm.endScope();
  resetCache();
  await state.dev.sync();
  return { adapter: adapterFacts, load_ms: performance.now() - t0 };
}

function resetCache() {
  state.tvm.beginScope();
  state.fn.kv_state_clear(state.kv);
  state.fn.kv_state_add_sequence(state.kv, new tvmjs.Scalar(0, "int64"));
  state.tvm.endScope();
  state.past = 0;
}

// One call of at most prefill_chunk_size tokens: embed, then every position's logits (the
// engine's decode function for a single token, as WebLLM calls it).
async function forwardChunk(tokens) {
  const tvm = state.tvm;
  tvm.beginScope();
  const ids = tvm.empty([tokens.length], "int32", state.dev);
  ids.copyFrom(new Int32Array(tokens));
  const embed = state.fn.embed(ids, state.params);
  const input = embed.view([1, tokens.length, state.meta.hidden_size]);
  state.fn.kv_state_begin_forward(state.kv, tvm.makeShapeTuple([0]), tvm.makeShapeTuple([tokens.length]));
  const out = (tokens.length === 1 ? state.fn.decode : state.fn.prefill_all)(input, state.kv, state.params);
  state.fn.kv_state_end_forward(state.kv);
  const logits = out.get(0);
  const host = tvm.empty(logits.shape, "float32", tvm.cpu());
  host.copyFrom(logits);
  await state.dev.sync();
  const values = new Float32Array(host.toArray());
  tvm.endScope();
  state.past += tokens.length;
  return values;
}

// Runs tokens at positions past.. and returns logits [T, V] on the CPU.
async function forward(tokens) {
  const t0 = performance.now();
  const chunk = state.meta.prefill_chunk_size;
  const vocab = state.meta.vocab_size;
  const values = new Float32Array(tokens.length * vocab);
  for (let i = 0; i < tokens.length; i += chunk) {
    values.set(await forwardChunk(tokens.slice(i, i + chunk)), i * vocab);
  }
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
