"""llama.cpp, driven over a pipe: run by the Python that has llama-cpp-python (the peer venv).

edgeslm does not depend on llama-cpp-python, so targets/gguf.py starts this file as a subprocess of
whichever interpreter has it, and speaks one JSON line per request on stdin. Answers are one JSON
line on stdout, followed, for logits, by rows*vocab float32 bytes. This file imports nothing from
edgeslm (the peer venv does not have it).

Requests:
  {"op": "eval", "tokens": [...], "start": p, "logits": "all"|"last"}  tokens at positions p..;
        the KV cache keeps positions < p and drops the rest (llama-cpp-python's own rule)
  {"op": "bench", "prompt": [...], "decode": n}  prefill the prompt, then n greedy decode steps;
        answers seconds for each phase, the tokens, and this process's peak RSS
  {"op": "tokenize", "text": "..."}   llama.cpp's own tokenizer (no BOS, specials as text)
  {"op": "nll", "tokens": [...]}   one window from an empty cache: summed next-token NLL (float64)
  {"op": "quit"}
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import time
from collections import deque


def peak_rss_mb() -> float:
    """VmHWM of this process: ru_maxrss would also count the parent's pages at fork (Linux keeps it across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LlamaLog:
    """llama.cpp's warnings and errors, written to a stderr that llama-cpp-python's quiet mode does not
    silence (it points fd 2 at /dev/null while a model loads) and kept, so that a failed load can say why."""

    WARN, ERROR, CONT = 3, 4, 5  # ggml_log_level

    def __init__(self, llama_cpp, stream):
        self.stream, self.lines, self.level = stream, deque(maxlen=8), 0
        self.callback = llama_cpp.llama_log_callback(self.write)  # held: llama.cpp keeps the pointer
        llama_cpp.llama_log_set(self.callback, None)

    def write(self, level, text, _user_data):
        self.level = self.level if level == self.CONT else level
        if self.level >= self.WARN:
            line = text.decode("utf-8", errors="replace")
            self.stream.write(line)
            self.stream.flush()
            if line.strip():
                self.lines.append(line.strip())

    def tail(self) -> str:
        return " | ".join(self.lines) or "no log line"


def plain_cpu_kernels(llama_cpp):
    """Keeps llama.cpp's weights out of ggml's extra CPU buffer types (the Q4_0 repack, and AMX in a
    build that has it), so every product runs in ggml's plain CPU kernels.

    llama-cpp-python 0.3.36 compiled with GGML_NATIVE on this AVX-512 machine (scripts/setup.sh)
    gives wrong products through the repacked Q4_0 weights: SmolLM2-135M Q4_0 agrees with the
    reference for 3 of 32 greedy tokens (max |logit diff| 29) with the repack, 32 of 32 (1.2)
    without it (tests/test_target_gguf.py::test_smollm2_q4_0_in_llama_cpp). A build with AMX made by
    GCC 12 faults at `ldtilecfg` instead: its `_tile_loadconfig` declares an 8-byte operand, so the
    compiler drops the tile sizes. The plain kernels compute the same Q4_0 x Q8_0 / Q8_0 x Q8_0 dot
    products for every GGUF this worker runs, edgeslm's and the peers' alike."""
    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = without_extra_buffers  # what Llama() calls for its params


def main():
    path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kv = sys.argv[4] if len(sys.argv) > 4 else "f16"  # llama.cpp's default KV cache type is f16
    # "last": only the last position's logits, as llama.cpp computes them for generation (benchmarks);
    # "all": every position's (verify and perplexity need them)
    logits_all = (sys.argv[5] if len(sys.argv) > 5 else "all") == "all"
    out = sys.stdout.buffer

    def answer(header, payload=b""):
        out.write((json.dumps(header) + "\n").encode())
        out.write(payload)
        out.flush()

    # A crash inside llama.cpp (a signal) prints the Python stack to the real stderr, for the parent.
    stderr = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=stderr)
    import llama_cpp
    import llama_cpp.llama_cpp as llama_lib
    import numpy as np

    rss_base = peak_rss_mb()
    log = LlamaLog(llama_lib, stderr)
    plain_cpu_kernels(llama_lib)

    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv]
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                              n_threads_batch=threads, logits_all=logits_all, type_k=kv_type, type_v=kv_type,
                              verbose=False)
    except Exception as e:  # llama-cpp-python says only "Failed to load model"; llama.cpp's log says why
        answer({"error": f"{type(e).__name__}: {e}; llama.cpp: {log.tail()}"})
        return
    vocab = llm.n_vocab()

    answer({"ready": True, "vocab": vocab, "llama_cpp_python": llama_cpp.__version__})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                break
            if op == "eval":
                start, tokens = int(req["start"]), [int(t) for t in req["tokens"]]
                llm.n_tokens = start
                llm.eval(tokens)
                rows = llm.scores[start : start + len(tokens)]
                if req.get("logits") == "last":
                    rows = rows[-1:]
                data = np.ascontiguousarray(rows, dtype=np.float32)
                answer({"rows": data.shape[0], "vocab": vocab}, data.tobytes())
            elif op == "bench":
                prompt, steps = [int(t) for t in req["prompt"]], int(req["decode"])
                llm.n_tokens = 0
                t0 = time.perf_counter()
                llm.eval(prompt)
                t1 = time.perf_counter()
                tokens = []
                nxt = int(np.argmax(llm.scores[len(prompt) - 1]))
                t2 = time.perf_counter()
                for _ in range(steps):
                    tokens.append(nxt)
                    llm.eval([nxt])
                    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                t3 = time.perf_counter()
                answer({"prefill_s": t1 - t0, "decode_s": t3 - t2, "tokens": tokens,
                        "peak_rss_mb": peak_rss_mb(),
                        "rss_before_load_mb": rss_base})
            elif op == "nll":
                tokens = [int(t) for t in req["tokens"]]
                llm.n_tokens = 0
                llm.eval(tokens)
                logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
                top = logits.max(-1, keepdims=True)
                logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
                nll = float((logz - logits[np.arange(len(tokens) - 1), tokens[1:]]).sum())
                answer({"nll": nll, "n": len(tokens) - 1})
            elif op == "tokenize":
                ids = llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=False)
                answer({"tokens": list(ids)})
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as e:  # report to the parent, which raises it as one line
            answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
