#!/usr/bin/env bash
# The peers edgeslm is measured against, in their own venv (benchmarks/.venv-peers, gitignored):
# llama-cpp-python BUILT FROM SOURCE (it compiles llama.cpp for this CPU) and onnxruntime-genai
# (its model builder makes the int4 ONNX peer). Neither is a runtime dependency of edgeslm.
# Idempotent: a second run checks a stamp and returns at once. Compiling llama.cpp on 2 cores
# takes minutes (see benchmarks/RESULTS.md), so run it with `nice` in the background.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=benchmarks/.venv-peers
STAMP=$VENV/.peers-setup
LLAMA_CPP_PYTHON=0.3.36
ORT_GENAI=0.18.0
want="llama-cpp-python==$LLAMA_CPP_PYTHON onnxruntime-genai==$ORT_GENAI torch==2.13.0 v1"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
command -v "$PY" >/dev/null || { echo "setup_peers: $PY not found; install Python 3.11" >&2; exit 2; }
command -v cmake >/dev/null || { echo "setup_peers: cmake not found (apt-get install -y cmake)" >&2; exit 2; }
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# The CPU torch wheel on disk; without the pin the genai builder's deps could pull a CUDA build.
echo "torch==2.13.0" >"$constraints"

start=$(date +%s)
# GGML_NATIVE: tuned for this CPU (AVX2/AVX-512 where present), as a user building llama.cpp gets.
# No server, no examples, no curl: only the library the Python binding loads.
echo "setup_peers: compiling llama-cpp-python $LLAMA_CPP_PYTHON from source (minutes on 2 cores)"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  pip install --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON" -c "$constraints"
built=$(date +%s)
echo "setup_peers: llama-cpp-python built in $((built - start)) s"

# onnxruntime-genai and what its model builder imports (torch from the wheel on disk).
pip install "onnxruntime-genai==$ORT_GENAI" torch==2.13.0 transformers==5.24.0 onnx==1.23.2 \
  onnxscript==0.7.2 onnx-ir safetensors psutil -c "$constraints"
echo "setup_peers: onnxruntime-genai installed in $(( $(date +%s) - built )) s"

echo "$want" >"$STAMP"
echo "setup_peers: done in $(( $(date +%s) - start )) s"
