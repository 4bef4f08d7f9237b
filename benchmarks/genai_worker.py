"""onnxruntime-genai, driven over a pipe (run by the main venv's Python).

Same protocol as targets/gguf_worker.py: one JSON request per stdin line, one JSON answer per line.
  {"op": "bench", "prompt": [...], "decode": n}   prefill seconds, decode seconds, peak RSS
  {"op": "nll", "tokens": [...]}                  summed next-token NLL of one window
Usage: genai_worker.py MODEL_FOLDER [THREADS]
THREADS sets the session's intra-op threads through og.Config.overlay (inter-op 1), the same way for
every folder, so an artifact's own genai_config.json need not carry them.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """VmHWM of this process: ru_maxrss would also count the parent's pages at fork (Linux keeps it across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    import numpy as np
    import onnxruntime_genai as og

    rss_base = peak_rss_mb()
    config = og.Config(sys.argv[1])
    if len(sys.argv) > 2:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(sys.argv[2]), "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def answer(header):
        sys.stdout.write(json.dumps(header) + "\n")
        sys.stdout.flush()

    def generator(max_length):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    pruned = False  # learnt from the first window: the graph returns the last position's logits only
    answer({"ready": True, "onnxruntime_genai": og.__version__})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "bench":
                prompt, steps = [int(t) for t in req["prompt"]], int(req["decode"])
                gen = generator(len(prompt) + steps + 1)
                t0 = time.perf_counter()
                gen.append_tokens(np.array([prompt], dtype=np.int32))  # runs the prefill
                t1 = time.perf_counter()
                tokens = []
                for _ in range(steps):
                    gen.generate_next_token()  # greedy pick from the last logits, then one forward
                    tokens.append(int(gen.get_next_tokens()[0]))
                t2 = time.perf_counter()
                answer({"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens,
                        "peak_rss_mb": peak_rss_mb(),
                        "rss_before_load_mb": rss_base})
            elif req["op"] == "nll":
                tokens = [int(t) for t in req["tokens"]]
                gen = generator(len(tokens))  # a window may fill the artifact's whole context
                if not pruned:
                    gen.append_tokens(np.array([tokens], dtype=np.int32))
                    logits = np.asarray(gen.get_output("logits"), dtype=np.float64).reshape(-1, model_vocab(gen))
                    pruned = logits.shape[0] == 1 < len(tokens)
                    if pruned:
                        gen = generator(len(tokens))
                if pruned:  # one token per call, each call's logits are that position's
                    rows = []
                    for t in tokens:
                        gen.append_tokens(np.array([[t]], dtype=np.int32))
                        rows.append(np.asarray(gen.get_output("logits"), dtype=np.float64).reshape(-1))
                    logits = np.stack(rows)
                if logits.shape[0] != len(tokens):
                    raise RuntimeError(f"genai returned logits for {logits.shape[0]} of {len(tokens)} positions")
                logits = logits[:-1]
                top = logits.max(-1, keepdims=True)
                logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
                nll = float((logz - logits[np.arange(len(tokens) - 1), tokens[1:]]).sum())
                answer({"nll": nll, "n": len(tokens) - 1})
            else:
                answer({"error": f"unknown op {req['op']!r}"})
        except Exception as e:
            answer({"error": f"{type(e).__name__}: {e}"})


def model_vocab(gen) -> int:
    return int(gen.get_output("logits").shape[-1])


if __name__ == "__main__":
    main()
