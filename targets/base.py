"""The Target interface. A target is one module here plus one line in registry.py.

    export(model, scheme, out, ctx) -> dict   write the artifact files into `out` (a temporary
                                              folder that artifact.atomic_folder renames later);
                                              return target-specific manifest fields
    load(folder, manifest) -> Runner          open the artifact in the ecosystem's own runtime

`model` is the reference Decoder, float or already quantized by edgeslm (int4/int8 modules from
qformat.py): a target maps those packed tensors and never re-quantizes from float. Export traces
the torch reference path (ops.reference_only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ExportContext:
    """What every export needs besides the model."""

    model_name: str  # as given by the user, for the manifest
    reference: str  # folder of the (quantized) reference checkpoint that verify compares against
    context_length: int = 512  # static KV cache length
    prefill_chunk: int = 64  # tokens per prefill call for targets with static shapes
    tokenizer: object = None
    options: dict = field(default_factory=dict)  # target-specific flags from the CLI


class Runner:
    """An artifact loaded in its runtime. Targets implement prefill/decode; the rest is shared."""

    runtime: str = ""  # e.g. "onnxruntime 1.32.0", shown by verify and check

    def reset(self):
        """Empties the KV cache."""
        raise NotImplementedError

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [1, T] at positions start.. -> logits [1, T, V] (fp32), updating the cache. A runtime
        whose graph computes the last position only returns [1, 1, V] and sets score_chunk = 1."""
        raise NotImplementedError

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """One token at `pos` -> logits [V] (fp32)."""
        raise NotImplementedError

    def stream_greedy(self, prompt: torch.Tensor, steps: int):
        """prompt [1, T0] -> yields (token, logits [V]) for up to `steps` greedy steps: one prefill from
        an empty cache, then one decode per step. The next decode runs only when the consumer asks for
        the next token, so a consumer that stops early (an end-of-sequence token, Ctrl-C) runs no
        wasted step."""
        self.reset()
        last = self.prefill(prompt, 0)[0, -1]
        for step in range(steps):
            nxt = int(last.argmax())
            yield nxt, last
            if step + 1 < steps:
                last = self.decode(nxt, prompt.shape[1] + step)

    def generate_greedy(self, prompt: torch.Tensor, steps: int):
        """prompt [1, T0] -> (tokens [steps], logits [steps, V]) with prefill then decode."""
        tokens, logits = [], []
        for token, last in self.stream_greedy(prompt, steps):
            tokens.append(token)
            logits.append(last)
        return torch.tensor(tokens), torch.stack(logits)

    score_chunk: int | None = None  # tokens per prefill call in score(); None = the whole window at once

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] -> logits [1, T, V], from an empty cache (perplexity windows)."""
        self.reset()
        step = self.score_chunk or ids.shape[1]
        return torch.cat([self.prefill(ids[:, i : i + step], i) for i in range(0, ids.shape[1], step)], dim=1)

    def close(self):
        pass

    def measure_speed(self, prompt_len: int = 128, decode_steps: int = 64, repeats: int = 3, vocab: int | None = None) -> dict:
        """Time to first token (prefill of `prompt_len` tokens) and decode tokens/s through this runner.

        The latency checks reuse this: best of `repeats` for prefill (one warm-up first), the median
        per-token time over `decode_steps` steps for decode. Token ids are fixed, so runs compare.
        """
        import statistics
        import time

        ids = (torch.arange(prompt_len) * 7919 % (vocab or 1000)).view(1, -1)
        self.reset()
        self.prefill(ids, 0)  # warm-up (allocations, lazy kernels)
        ttft = []
        for _ in range(repeats):
            self.reset()
            t0 = time.perf_counter()
            last = self.prefill(ids, 0)[0, -1]
            ttft.append(time.perf_counter() - t0)
        per_token = []
        token = int(last.argmax())
        for step in range(decode_steps):
            t0 = time.perf_counter()
            token = int(self.decode(token, prompt_len + step).argmax())
            per_token.append(time.perf_counter() - t0)
        decode_s = statistics.median(per_token)
        return {"runtime": self.runtime, "prompt_tokens": prompt_len, "ttft_s": min(ttft),
                "prefill_tok_s": prompt_len / min(ttft), "decode_steps": decode_steps,
                "decode_tok_s": 1.0 / decode_s, "decode_ms_per_token": 1000 * decode_s}


class Target:
    name: str = ""
    description: str = ""
    artifact_suffix: str = ""  # e.g. "model.onnx": the main file, for listings

    def unavailable_reason(self) -> str | None:
        """None when this machine can export and run the target, else why not (names the fix)."""
        return None

    def unsupported_reason(self, model, scheme) -> str | None:
        """None when the target can express this model and scheme, else a one-line reason."""
        return None

    def export(self, model, scheme, out: Path, ctx: ExportContext) -> dict:
        raise NotImplementedError

    def load(self, folder: Path, manifest: dict) -> Runner:
        raise NotImplementedError

    def parity_bounds(self, scheme) -> dict:
        """What `edgeslm verify` requires of this target's artifacts for `scheme` (None: not bound).

        max_abs_logit: teacher-forced logits vs the reference decoder; tokens_identical: every greedy
        token agrees, teacher-forced; min_greedy_agree (a count) or min_greedy_agree_rate (a share
        of the steps): at least that many agree; free_running_identical: the artifact's own greedy
        output equals the reference's for every step; free_running_min_prefix(_rate): for at least
        that many; tie_margin: a step is a tie below it (default parity.TIE_MARGIN); ppl_rel:
        |ppl(artifact) / ppl(reference) - 1| on the Brown test split; basis: why these numbers.
        The default is exact: the target multiplies the reference's own codes in float. A target
        whose arithmetic differs (8-bit activations, an fp16 cache) overrides this, or records bounds
        derived at export in the manifest's "parity_bounds", which verify prefers.
        """
        exact = 1e-3 if scheme.quantized else 1e-4
        return {"max_abs_logit": exact, "tokens_identical": True, "free_running_identical": True, "ppl_rel": 0.01,
                "basis": "exact: the reference's weights, float arithmetic (only summation order differs)"}

    def inspect(self, folder: Path, manifest: dict) -> dict:
        """Target-specific facts for verify (ops, shaders, dtypes...)."""
        return {}
