// The artifact in @mlc-ai/web-llm's own engine, unchanged: CreateMLCEngine with an appConfig that
// names the artifact folder (served under /model/resolve/main/, the layout the engine expects
// of a model URL) and its model.wasm. window.edgeslm answers the node driver (driver.mjs).
import * as webllm from "/webllm/index.js";

const MODEL_ID = "edgeslm-artifact";
const state = { engine: null, meta: null };

function log(msg) {
  document.getElementById("log").textContent += msg + "\n";
}

class Problem extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

async function load() {
  const t0 = performance.now();
  const meta = await (await fetch("/model/resolve/main/webgpu.json")).json();
  state.meta = meta;
  if (!navigator.gpu) throw new Problem("no_webgpu", "this browser exposes no navigator.gpu");
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Problem("no_adapter", "no WebGPU adapter");
  const info = adapter.info || {};
  const adapterFacts = {
    vendor: info.vendor || "", architecture: info.architecture || "", description: info.description || "",
    features: Array.from(adapter.features).sort(),
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
  };
  const appConfig = {
    model_list: [{
      model: location.origin + "/model",
      model_id: MODEL_ID,
      model_lib: location.origin + "/model/resolve/main/model.wasm",
      required_features: meta.features,
    }],
  };
  // temperature 0: the engine samples through the library's softmax (at 1e-6), argsort and top-p
  state.engine = await webllm.CreateMLCEngine(MODEL_ID, {
    appConfig, logLevel: "WARN", initProgressCallback: (r) => log(r.text),
  }, { temperature: 0, top_p: 1.0 });
  return { adapter: adapterFacts, load_ms: performance.now() - t0, webllm_version: meta.webllm_version };
}

window.edgeslm = {
  ready: null,
  async reset() {
    await state.engine.resetChat();
    return {};
  },
  // Greedy tokens from the engine's own forward-and-sample path: the prompt as one prefill (the
  // engine splits it by prefill_chunk_size), then one decode per new token, fed back, or the
  // next of `forced` when given (the engine's choice is still returned at every step).
  async generate(prompt, steps, forced) {
    await state.engine.resetChat();
    const tokens = [];
    const t0 = performance.now();
    let next = await state.engine.forwardTokensAndSample(prompt, true);
    const prefillMs = performance.now() - t0;
    const decodeMs = [];
    tokens.push(next);
    for (let s = 1; s < steps; s++) {
      const t = performance.now();
      next = await state.engine.forwardTokensAndSample([forced ? forced[s - 1] : next], false);
      decodeMs.push(performance.now() - t);
      tokens.push(next);
    }
    return { tokens, prefill_ms: prefillMs, decode_ms: decodeMs };
  },
  // Streaming: the prompt's prefill returns the first token, each step the next one.
  async begin(prompt) {
    await state.engine.resetChat();
    const t0 = performance.now();
    const token = await state.engine.forwardTokensAndSample(prompt, true);
    return { token, ms: performance.now() - t0 };
  },
  async step(token) {
    const t0 = performance.now();
    const next = await state.engine.forwardTokensAndSample([token], false);
    return { token: next, ms: performance.now() - t0 };
  },
  // The OpenAI-style completion API on a text prompt (tokenizer, conversation, stop handling).
  async complete(prompt, maxTokens) {
    const r = await state.engine.completions.create({
      prompt, max_tokens: maxTokens, temperature: 0, top_p: 1.0, ignore_eos: true,
    });
    return { text: r.choices[0].text, usage: r.usage };
  },
};

window.edgeslm.ready = load().then(
  (facts) => ({ ok: true, ...facts }),
  (e) => ({ ok: false, kind: e.kind || "error", message: String(e && e.message ? e.message : e) }),
);
