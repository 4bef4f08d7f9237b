// edgeslm-runner: loads an edgeslm ExecuTorch artifact (.pte), runs prefill then greedy decode over
// the given prompt token ids, and prints one JSON object with the tokens and the timings.
//
// The program's methods follow the edgeslm ExecuTorch target:
//   prefill(tokens int [1, C], start_pos int) -> logits [1, C, V]   (C: a fixed chunk)
//   decode (tokens int [1, 1], start_pos int) -> logits [1, 1, V]
//   reset  (dummy [1])                        -> empties the cache (optional; called before each run)
// with the KV cache as mutable buffers the two methods share (share_mutable_buffers), so the
// Module is built with share_memory_arenas, as the Python runtime does for host-only methods.
// A method with more than two inputs carries its state explicitly instead: inputs 2.. start as
// zeros and take outputs 1.. of the previous call. Shapes and dtypes come from MethodMeta, so
// start_pos may be a 0-dim or [1] tensor, int32 or int64. A prompt that is not a whole number of
// chunks is prefilled chunk by chunk and its remainder fed through decode, one token at a time.
// A program with only `forward` uses it for both.
//
// Written here because ExecuTorch's own llm runner (extension/llm/runner) is not in the wheel and
// expects its own method names and metadata.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::MethodMeta;

namespace {

struct Options {
  std::string model;
  std::vector<int64_t> prompt;
  int steps = 16;
  int runs = 1;
  int warmup = 0;
  std::string prefill = "prefill";
  std::string decode = "decode";
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "edgeslm-runner: error: %s\n", message.c_str());
  std::exit(2);
}

const char* usage =
    "usage: edgeslm-runner --model FILE.pte --tokens ID,ID,... [--steps N] [--runs N] [--warmup N]\n"
    "                      [--prefill-method NAME] [--decode-method NAME]\n"
    "Runs prefill then greedy decode; prints JSON: tokens, ttft_ms and decode_ms_per_token per run,\n"
    "load_ms, peak_rss_kb. Exit 2 on bad input, 1 when the runtime fails.\n";

int parse_int(const std::string& text, const char* what) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 0 || value > (1L << 30)) {
    fail(std::string(what) + " must be a non-negative integer, got '" + text + "'");
  }
  return static_cast<int>(value);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) fail(arg + " needs a value\n" + usage);
    std::string value = argv[++i];
    if (arg == "--model") {
      o.model = value;
    } else if (arg == "--tokens") {
      std::stringstream ss(value);
      std::string item;
      while (std::getline(ss, item, ',')) o.prompt.push_back(parse_int(item, "a token id"));
    } else if (arg == "--steps") {
      o.steps = parse_int(value, "--steps");
    } else if (arg == "--runs") {
      o.runs = parse_int(value, "--runs");
    } else if (arg == "--warmup") {
      o.warmup = parse_int(value, "--warmup");
    } else if (arg == "--prefill-method") {
      o.prefill = value;
    } else if (arg == "--decode-method") {
      o.decode = value;
    } else {
      fail("unknown option " + arg + "\n" + usage);
    }
  }
  if (o.model.empty()) fail(std::string("--model is required\n") + usage);
  if (o.prompt.empty()) fail(std::string("--tokens is required (at least one id)\n") + usage);
  if (o.steps < 1) fail("--steps must be at least 1");
  if (o.runs < 1) fail("--runs must be at least 1");
  return o;
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

void check(Error error, const std::string& what) {
  if (error != Error::Ok) {
    std::fprintf(stderr, "edgeslm-runner: %s failed (ExecuTorch error 0x%x)\n", what.c_str(),
                 static_cast<unsigned>(error));
    std::exit(1);
  }
}

std::vector<executorch::aten::SizesType> sizes_of(const executorch::runtime::TensorInfo& info) {
  auto s = info.sizes();
  return std::vector<executorch::aten::SizesType>(s.begin(), s.end());
}

// One method and the inputs it is fed: tokens, start_pos, and any explicit state.
struct Step {
  std::string name;
  int chunk = 1;
  TensorPtr tokens;
  TensorPtr position;
  std::vector<TensorPtr> state;  // explicit state inputs (empty with shared mutable buffers)
  int vocab = 0;

  void bind(Module& module, const std::string& method) {
    name = method;
    check(module.load_method(method), "loading method '" + method + "'");
    auto meta_result = module.method_meta(method);
    if (!meta_result.ok()) check(meta_result.error(), "reading the signature of '" + method + "'");
    MethodMeta meta = meta_result.get();
    if (meta.num_inputs() < 2) fail("method '" + method + "' takes " + std::to_string(meta.num_inputs()) +
                                    " inputs; expected (tokens, start_pos[, state...])");
    auto tok_info = meta.input_tensor_meta(0).get();
    auto tok_sizes = sizes_of(tok_info);
    if (tok_sizes.size() != 2 || tok_sizes[0] != 1) fail("method '" + method + "': tokens must be [1, C]");
    chunk = tok_sizes[1];
    tokens = executorch::extension::zeros(tok_sizes, tok_info.scalar_type());
    auto pos_info = meta.input_tensor_meta(1).get();
    position = executorch::extension::zeros(sizes_of(pos_info), pos_info.scalar_type());
    for (size_t i = 2; i < meta.num_inputs(); ++i) {
      auto info = meta.input_tensor_meta(i).get();
      state.push_back(executorch::extension::zeros(sizes_of(info), info.scalar_type()));
    }
    auto out_info = meta.output_tensor_meta(0).get();
    auto out_sizes = sizes_of(out_info);
    if (out_info.scalar_type() != ScalarType::Float || out_sizes.empty())
      fail("method '" + method + "': output 0 must be float logits [1, C, V]");
    vocab = out_sizes.back();
  }

  static void set_int(Tensor& t, size_t index, int64_t value) {
    if (t.scalar_type() == ScalarType::Long) {
      t.mutable_data_ptr<int64_t>()[index] = value;
    } else if (t.scalar_type() == ScalarType::Int) {
      t.mutable_data_ptr<int32_t>()[index] = static_cast<int32_t>(value);
    } else {
      fail("method '" + std::string("tokens/start_pos") + "' must be int32 or int64");
    }
  }

  void reset_state() {
    for (auto& s : state) std::memset(s->mutable_data_ptr(), 0, s->nbytes());
  }

  // Runs tokens[first, first + chunk) at `pos`; returns the argmax of the logits at row `row`.
  int64_t run(Module& module, const std::vector<int64_t>& ids, size_t first, int64_t pos, int row) {
    for (int i = 0; i < chunk; ++i) set_int(*tokens, i, ids[first + i]);
    set_int(*position, 0, pos);
    std::vector<EValue> inputs{EValue(*tokens), EValue(*position)};
    for (auto& s : state) inputs.emplace_back(*s);
    auto result = module.execute(name, inputs);
    if (!result.ok()) check(result.error(), "executing '" + name + "'");
    const auto& outputs = result.get();
    const Tensor logits = outputs[0].toTensor();
    const float* row_ptr = logits.const_data_ptr<float>() + static_cast<size_t>(row) * vocab;
    int64_t best = std::max_element(row_ptr, row_ptr + vocab) - row_ptr;
    // explicit state: outputs 1.. become the next call's inputs 2..
    for (size_t i = 0; i < state.size() && i + 1 < outputs.size(); ++i) {
      const Tensor out = outputs[i + 1].toTensor();
      std::memcpy(state[i]->mutable_data_ptr(), out.const_data_ptr(), state[i]->nbytes());
    }
    return best;
  }
};

struct RunResult {
  std::vector<int64_t> tokens;
  double ttft_ms = 0;
  std::vector<double> decode_ms;
};

// The program's `reset(dummy [1])` method, when it has one, empties the shared KV cache.
struct Reset {
  bool present = false;
  TensorPtr dummy;

  void bind(Module& module, bool has_reset) {
    if (!has_reset) return;
    check(module.load_method("reset"), "loading method 'reset'");
    auto meta = module.method_meta("reset");
    if (!meta.ok()) check(meta.error(), "reading the signature of 'reset'");
    if (meta.get().num_inputs() != 1) return;  // not ours: leave the cache to position masking
    auto info = meta.get().input_tensor_meta(0).get();
    dummy = executorch::extension::zeros(sizes_of(info), info.scalar_type());
    present = true;
  }

  void run(Module& module) {
    if (!present) return;
    auto result = module.execute("reset", std::vector<EValue>{EValue(*dummy)});
    if (!result.ok()) check(result.error(), "executing 'reset'");
  }
};

RunResult generate(Module& module, Step& prefill, Step& decode, Reset& reset, const Options& o) {
  RunResult r;
  reset.run(module);
  prefill.reset_state();
  decode.reset_state();
  const size_t n = o.prompt.size();
  double t0 = now_ms();
  int64_t next = -1;
  size_t done = 0;
  while (n - done >= static_cast<size_t>(prefill.chunk)) {
    next = prefill.run(module, o.prompt, done, static_cast<int64_t>(done), prefill.chunk - 1);
    done += prefill.chunk;
  }
  for (; done < n; ++done) next = decode.run(module, o.prompt, done, static_cast<int64_t>(done), 0);
  r.ttft_ms = now_ms() - t0;
  std::vector<int64_t> ids(o.prompt);
  r.tokens.push_back(next);
  for (int step = 1; step < o.steps; ++step) {
    ids.push_back(next);
    double t = now_ms();
    next = decode.run(module, ids, ids.size() - 1, static_cast<int64_t>(ids.size() - 1), 0);
    r.decode_ms.push_back(now_ms() - t);
    r.tokens.push_back(next);
  }
  return r;
}

template <typename T>
std::string join(const std::vector<T>& values) {
  std::ostringstream out;
  out.precision(6);
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  if (FILE* f = std::fopen(o.model.c_str(), "rb")) {
    std::fclose(f);
  } else {
    fail("cannot open " + o.model);
  }
  executorch::runtime::runtime_init();
  double t_load = now_ms();
  // share_memory_arenas: the prefill and decode methods share the KV cache buffers (mem_id 2).
  Module module(o.model, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, /*share_memory_arenas=*/true);
  check(module.load(), "loading " + o.model);
  auto names_result = module.method_names();
  if (!names_result.ok()) check(names_result.error(), "listing methods");
  const auto& names = names_result.get();
  auto has = [&](const std::string& n) { return names.count(n) > 0; };
  if (!has(o.prefill) && has("forward")) o.prefill = "forward";
  if (!has(o.decode) && has("forward")) o.decode = "forward";
  if (!has(o.prefill) || !has(o.decode))
    fail(o.model + " has no '" + o.prefill + "'/'" + o.decode + "' methods (nor 'forward')");
  Step prefill, decode;
  prefill.bind(module, o.prefill);
  decode.bind(module, o.decode);
  // explicit state: one set of tensors, read and written by both methods
  if (!prefill.state.empty()) decode.state = prefill.state;
  if (decode.chunk != 1) fail("method '" + o.decode + "' must take one token ([1, 1]), takes " +
                              std::to_string(decode.chunk));
  for (int64_t id : o.prompt)
    if (id >= prefill.vocab) fail("token id " + std::to_string(id) + " is outside the vocabulary");
  
  Reset reset;
  reset.bind(module, has("reset"));
  double load_ms = now_ms() - t_load;
  for (int i = 0; i < o.warmup; ++i) generate(module, prefill, decode, reset, o);
  std::vector<RunResult> runs;
  for (int i = 0; i < o.runs; ++i) runs.push_back(generate(module, prefill, decode, reset, o));
  for (const auto& r : runs)
    if (r.tokens != runs[0].tokens) {
      std::fprintf(stderr, "edgeslm-runner: runs disagree on the greedy tokens (state not reset?)\n");
      return 1;
    }

  struct rusage usage_now;
  getrusage(RUSAGE_SELF, &usage_now);
  std::printf("{\n  \"runtime\": \"executorch native (edgeslm-runner)\",\n");
  std::printf("  \"model\": \"%s\",\n", o.model.c_str());
  std::printf("  \"prefill_method\": \"%s\", \"prefill_chunk\": %d, \"decode_method\": \"%s\",\n", o.prefill.c_str(),
              prefill.chunk, o.decode.c_str());
  std::printf("  \"prompt_tokens\": %zu, \"steps\": %d, \"warmup\": %d,\n", o.prompt.size(), o.steps, o.warmup);
  std::printf("  \"tokens\": [%s],\n", join(runs[0].tokens).c_str());
  std::printf("  \"load_ms\": %.3f,\n  \"runs\": [\n", load_ms);
  for (size_t i = 0; i < runs.size(); ++i) {
    std::printf("    {\"ttft_ms\": %.4f, \"decode_ms\": [%s]}%s\n", runs[i].ttft_ms, join(runs[i].decode_ms).c_str(),
                i + 1 < runs.size() ? "," : "");
  }
  std::printf("  ],\n  \"peak_rss_kb\": %ld\n}\n", usage_now.ru_maxrss);
  return 0;
}
