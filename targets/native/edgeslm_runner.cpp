// edgeslm-runner: loads an edgeslm ExecuTorch artifact (.pte + its .ptd), runs prefill then greedy decode over
// the given prompt token ids, and prints one JSON object with the tokens and the timings.
//
// It drives the program as ExecuTorch's LLM runner (extension/llm/runner, TextLLMRunner) does:
//   forward(tokens int [1, T], input_pos int [1]) -> logits [1, 1, V] (or [1, T, V]), T dynamic up to get_max_seq_len,
// the KV cache in the program's mutable buffers; the prompt goes in chunks of at most
// get_max_seq_len tokens, then one token per call. get_max_seq_len, get_max_context_len and
// get_vocab_size are read from the program's constant methods. A prompt plus steps beyond
// get_max_context_len is refused before anything runs (exit 2), never written past the cache.
//
// ExecuTorch's own runner library is not in the executorch wheel's CMake package, hence this
// small driver of the same contract; it also times prefill and each decode step.
// Programs that call llama::custom_sdpa / llama::update_cache need those kernels linked in
// (CMakeLists.txt links the wheel's custom-ops library when it is there).

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <dlfcn.h>
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
  std::string data;
  int chunk = 0;  // 0: get_max_seq_len
  std::vector<int64_t> prompt;
  int steps = 16;
  int runs = 1;
  int warmup = 0;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "edgeslm-runner: error: %s\n", message.c_str());
  std::exit(2);
}

const char* usage =
    "usage: edgeslm-runner --model FILE.pte [--data FILE.ptd] --tokens ID,ID,... [--steps N] [--runs N] [--warmup N]\n"
    "                      [--chunk N]\n"
    "--data: the program's weights file, for a program exported with its constants outside the .pte.\n"
    "--chunk: prompt tokens per forward call, at most get_max_seq_len (the default).\n"
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
    } else if (arg == "--data") {
      o.data = value;
    } else if (arg == "--tokens") {
      std::stringstream ss(value);
      std::string item;
      while (std::getline(ss, item, ',')) o.prompt.push_back(parse_int(item, "a token id"));
    } else if (arg == "--chunk") {
      o.chunk = parse_int(value, "--chunk");
    } else if (arg == "--steps") {
      o.steps = parse_int(value, "--steps");
    } else if (arg == "--runs") {
      o.runs = parse_int(value, "--runs");
    } else if (arg == "--warmup") {
      o.warmup = parse_int(value, "--warmup");
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

// A program that calls llama::update_cache / llama::custom_sdpa needs their kernels. The executorch
// wheel ships them only inside its Python custom-ops library (which needs libpython's symbols), so
// they are loaded on demand, when forward fails to load without them.
bool load_llm_ops() {
#if defined(EDGESLM_CUSTOM_OPS_LIB)
  static bool tried = false, ok = false;
  if (tried) return ok;
  tried = true;
#if defined(EDGESLM_PYTHON_LIB)
  if (!dlopen(EDGESLM_PYTHON_LIB, RTLD_NOW | RTLD_GLOBAL)) return false;
#endif
  ok = dlopen(EDGESLM_CUSTOM_OPS_LIB, RTLD_NOW | RTLD_GLOBAL) != nullptr;
  if (!ok) std::fprintf(stderr, "edgeslm-runner: cannot load the LLM custom ops: %s\n", dlerror());
  return ok;
#else
  return false;
#endif
}

// The program's forward(tokens [1, T], input_pos [1]) and the constants ExecuTorch's LLM runner reads.
struct Forward {
  int max_seq_len = 1;
  int64_t max_context_len = 0;
  int64_t vocab = 0;
  ScalarType token_type = ScalarType::Long;
  ScalarType pos_type = ScalarType::Long;

  static int64_t constant(Module& module, const std::string& name, bool required) {
    auto names = module.method_names();
    if (!names.ok() || names.get().count(name) == 0) {
      if (required) {
        std::fprintf(stderr, "edgeslm-runner: the program lacks the constant method '%s' ExecuTorch's LLM runner reads\n",
                     name.c_str());
        std::exit(1);
      }
      return -1;
    }
    auto result = module.execute(name);
    if (!result.ok()) check(result.error(), "reading '" + name + "'");
    const EValue& v = result.get()[0];
    if (v.isInt()) return v.toInt();
    if (v.isBool()) return v.toBool() ? 1 : 0;
    fail("constant method '" + name + "' is not an integer");
  }

  void bind(Module& module) {
    Error loaded = module.load_method("forward");
    if (loaded != Error::Ok && load_llm_ops()) loaded = module.load_method("forward");
    check(loaded, "loading method 'forward'");
    auto meta_result = module.method_meta("forward");
    if (!meta_result.ok()) check(meta_result.error(), "reading the signature of 'forward'");
    MethodMeta meta = meta_result.get();
    if (meta.num_inputs() != 2) fail("method 'forward' takes " + std::to_string(meta.num_inputs()) +
                                     " inputs; expected (tokens [1, T], input_pos [1])");
    token_type = meta.input_tensor_meta(0).get().scalar_type();
    pos_type = meta.input_tensor_meta(1).get().scalar_type();
    max_seq_len = static_cast<int>(constant(module, "get_max_seq_len", true));
    max_context_len = constant(module, "get_max_context_len", true);
    vocab = constant(module, "get_vocab_size", true);
    if (max_seq_len < 1 || max_context_len < 1 || vocab < 1) fail("the program's constant methods are not positive");
  }

  TensorPtr ints(const std::vector<int64_t>& values, std::vector<executorch::aten::SizesType> sizes,
                 ScalarType type) const {
    if (type == ScalarType::Long) return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int64_t>(values));
    if (type == ScalarType::Int)
      return executorch::extension::make_tensor_ptr(std::move(sizes), std::vector<int32_t>(values.begin(), values.end()));
    fail("forward's inputs must be int32 or int64");
  }

  // Runs ids[first, first + n) at positions first..; returns the argmax of the last row's logits.
  int64_t run(Module& module, const std::vector<int64_t>& ids, size_t first, size_t n) const {
    if (static_cast<int64_t>(first + n) > max_context_len) fail("the tokens exceed get_max_context_len");
    std::vector<int64_t> chunk(ids.begin() + first, ids.begin() + first + n);
    auto tokens = ints(chunk, {1, static_cast<executorch::aten::SizesType>(n)}, token_type);
    auto position = ints({static_cast<int64_t>(first)}, {1}, pos_type);
    auto result = module.execute("forward", std::vector<EValue>{EValue(*tokens), EValue(*position)});
    if (!result.ok()) check(result.error(), "executing 'forward'");
    const Tensor logits = result.get()[0].toTensor();
    if (logits.scalar_type() != ScalarType::Float || logits.dim() < 2) fail("forward must return float logits [1, T or 1, V]");
    const int64_t v = logits.size(logits.dim() - 1);
    const int64_t rows = logits.numel() / v;
    const float* row = logits.const_data_ptr<float>() + (rows - 1) * v;
    return std::max_element(row, row + v) - row;
  }
};

struct RunResult {
  std::vector<int64_t> tokens;
  double ttft_ms = 0;
  std::vector<double> decode_ms;
};

// As ExecuTorch's LLM runner: the prompt in chunks of at most get_max_seq_len tokens, then one
// token per call; a new sequence starts at input_pos 0, so the cache needs no reset.
RunResult generate(Module& module, const Forward& forward, const Options& o) {
  RunResult r;
  const size_t n = o.prompt.size();
  double t0 = now_ms();
  int64_t next = -1;
  for (size_t done = 0; done < n;) {
    size_t take = std::min(n - done, static_cast<size_t>(forward.max_seq_len));
    next = forward.run(module, o.prompt, done, take);
    done += take;
  }
  r.ttft_ms = now_ms() - t0;
  std::vector<int64_t> ids(o.prompt);
  r.tokens.push_back(next);
  for (int step = 1; step < o.steps; ++step) {
    ids.push_back(next);
    double t = now_ms();
    next = forward.run(module, ids, ids.size() - 1, 1);
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
  for (const std::string& path : {o.model, o.data}) {
    if (path.empty()) continue;
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
      std::fclose(f);
    } else {
      fail("cannot open " + path);
    }
  }
  executorch::runtime::runtime_init();
  double t_load = now_ms();
  auto owned = o.data.empty() ? std::make_unique<Module>(o.model, Module::LoadMode::Mmap)
                              : std::make_unique<Module>(o.model, o.data, Module::LoadMode::Mmap);
  Module& module = *owned;
  check(module.load(), "loading " + o.model);
  Forward forward;
  forward.bind(module);
  if (o.chunk > forward.max_seq_len) fail("--chunk exceeds the program's get_max_seq_len");
  if (o.chunk > 0) forward.max_seq_len = o.chunk;
  for (int64_t id : o.prompt)
    if (id >= forward.vocab) fail("token id " + std::to_string(id) + " is outside the vocabulary");
  if (static_cast<int64_t>(o.prompt.size()) + o.steps - 1 > forward.max_context_len)
    fail("prompt (" + std::to_string(o.prompt.size()) + ") + steps (" + std::to_string(o.steps) +
         ") exceed the program's context (get_max_context_len " + std::to_string(forward.max_context_len) + ")");
  double load_ms = now_ms() - t_load;
  for (int i = 0; i < o.warmup; ++i) generate(module, forward, o);
  std::vector<RunResult> runs;
  for (int i = 0; i < o.runs; ++i) runs.push_back(generate(module, forward, o));
  for (const auto& r : runs)
    if (r.tokens != runs[0].tokens) {
      std::fprintf(stderr, "edgeslm-runner: runs disagree on the greedy tokens (state not reset?)\n");
      return 1;
    }

  struct rusage usage_now;
  getrusage(RUSAGE_SELF, &usage_now);
  std::printf("{\n  \"runtime\": \"executorch native (edgeslm-runner)\",\n");
  std::printf("  \"model\": \"%s\",\n", o.model.c_str());
  std::printf("  \"method\": \"forward\", \"max_seq_len\": %d, \"max_context_len\": %lld,\n", forward.max_seq_len,
              static_cast<long long>(forward.max_context_len));
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
