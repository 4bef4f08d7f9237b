# Sourced by scripts/setup.sh: installs llama-cpp-python, compiled from its sdist (PyPI ships no
# wheel), into the venv whose `pip` function is already defined. pip keeps the built wheel in its
# cache, so a second set-up on the same machine installs it in seconds.
LLAMA_CPP_PYTHON=0.3.36

install_llama_cpp_python() {
  local constraints=$1
  # GGML_NATIVE tunes ggml for this CPU. -mno-amx-*: GCC 12's `_tile_loadconfig` declares an 8-byte
  # operand, so with AMX enabled the optimiser drops the tile sizes and every Q4_0/Q8_0 product
  # faults at `ldtilecfg`; an explicit -mno-X wins over -march=native whatever the order.
  # No server, examples, tools or curl: only the library the binding loads.
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    pip install "llama-cpp-python==$LLAMA_CPP_PYTHON" -c "$constraints" 2> >(grep -v "is ignored" >&2)
}
