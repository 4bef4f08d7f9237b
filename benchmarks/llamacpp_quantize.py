"""llama.cpp's own quantizer (llama_model_quantize from llama-cpp-python): one GGUF -> another type.

    python benchmarks/llamacpp_quantize.py SRC DST TYPE [--pure] [--threads N]

Run by the peer venv's Python (the one with llama-cpp-python); imports nothing from edgeslm.
TYPE is a llama_ftype name without its LLAMA_FTYPE_MOSTLY_ prefix: Q4_0, Q4_K_M, Q8_0, F16, ...
A quantized source is dequantized and quantized again (allow_requantize), as llama-quantize
--allow-requantize does. --pure quantizes every tensor to TYPE (llama.cpp's own per-tensor choices
otherwise, e.g. a wider type for the output / tied embedding table). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("type")
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type}", None)
    if ftype is None:
        print(json.dumps({"error": f"llama.cpp has no type {args.type}"}))
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.pure = args.pure
    params.nthread = args.threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(params))
    seconds = time.perf_counter() - start
    if rc != 0:
        print(json.dumps({"error": f"llama_model_quantize returned {rc}"}))
        return 1
    print(json.dumps({"out": args.dst, "type": args.type, "pure": args.pure, "seconds": round(seconds, 2),
                      "llama_cpp_python": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
