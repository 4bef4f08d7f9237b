"""edgeslm run: text in, text out, through an artifact in its own runtime.

The artifact folder is self-contained for this: manifest.json names the target and the context,
the tokenizer ships in the folder (tokenizer/, or at its top), and Target.load opens the files
relative to the folder, so a copied folder runs as well as the original. Generation is
Runner.stream_greedy, the loop that `edgeslm verify` also runs (through generate_greedy): one
prefill, then one decode per token, greedy. Text streams to stdout as tokens arrive (transformers'
TextStreamer decides where a word is complete); figures go to stderr, or, with --json, one JSON
object goes to stdout and nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import EdgeSLMError
from .common import add_json_argument

HELP = "generate text from an artifact folder in its own runtime (greedy), streaming it, with tok/s at the end"

# end-of-turn tokens of the supported families' chat templates: generation stops at any that the
# tokenizer knows, besides its eos token
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def add_arguments(p):
    p.add_argument("artifact", help="an artifact folder written by `edgeslm export` (it may have been copied anywhere)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="tokens to generate at most (default %(default)s); generation also stops at an "
                        "end-of-sequence token and at the artifact's context")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the tokenizer's chat template (with the "
                        "assistant turn opened)")
    add_json_argument(p)


def artifact_tokenizer(folder: Path):
    from ..parity import artifact_tokenizer as shipped

    tokenizer = shipped(folder)
    if tokenizer is None:
        raise EdgeSLMError(f"{folder} ships no tokenizer; `edgeslm run` needs one to read text")
    return tokenizer


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not prompt:
        raise EdgeSLMError("the prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise EdgeSLMError("this artifact's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # the template already writes the special tokens (BOS included where the family uses one)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def stop_ids(tokenizer) -> set[int]:
    ids = set()
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(tokenizer.get_added_vocab())
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab and t in special)
    return ids


class _Streamer:
    """transformers' TextStreamer, writing into `out` (or nowhere) instead of print()."""

    def __init__(self, tokenizer, out):
        from transformers import TextStreamer

        streamer = self

        class Sink(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if streamer.out is not None:
                    streamer.out.write(text + ("\n" if stream_end else ""))
                    streamer.out.flush()

        self.out = out
        self.inner = Sink(tokenizer, skip_special_tokens=True)

    def put(self, token: int):
        import torch

        self.inner.put(torch.tensor([token]))

    def end(self):
        self.inner.end()


def generate(folder, prompt: str, max_tokens: int, chat: bool = False, out=None) -> dict:
    """Greedy generation from an artifact; streams text into `out` (a text stream) when given."""
    import torch

    from ..artifact import read_manifest
    from ..targets.registry import get_target

    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeSLMError(f"{folder} is not a folder")
    if max_tokens < 1:
        raise EdgeSLMError("--max-tokens must be at least 1")
    manifest = read_manifest(folder)
    missing = [rel for rel in manifest.get("files", {}) if not (folder / rel).is_file()]
    if missing:
        raise EdgeSLMError(f"{folder} lacks {len(missing)} of its manifest's files (first: {missing[0]})")
    context = int(manifest.get("context_length") or 0)
    if context < 1:
        raise EdgeSLMError(f"{folder}/manifest.json names no context_length")
    tokenizer = artifact_tokenizer(folder)
    ids = prompt_ids(tokenizer, prompt, chat)
    if not ids:
        raise EdgeSLMError("the prompt tokenizes to no tokens")
    if len(ids) >= context:
        raise EdgeSLMError(f"the prompt is {len(ids)} tokens; the artifact's context is {context}, which leaves "
                           "no room to generate; shorten the prompt or export with a larger --context")
    steps = min(max_tokens, context - len(ids))
    target = get_target(manifest["target"])
    reason = target.unavailable_reason() or (target.runtime_reason() if hasattr(target, "runtime_reason") else None)
    if reason:
        raise EdgeSLMError(f"cannot run {manifest['target']} artifacts here: {reason}")
    stops = stop_ids(tokenizer)
    # a target may generate through another runtime than verify's (webgpu: WebLLM's engine)
    runner = (getattr(target, "load_for_run", None) or target.load)(folder, manifest)
    streamer = _Streamer(tokenizer, out)
    tokens, stopped = [], "max_tokens" if steps == max_tokens else "context"
    times = []
    try:
        t0 = time.perf_counter()
        for token, _ in runner.stream_greedy(torch.tensor([ids], dtype=torch.long), steps):
            times.append(time.perf_counter())
            if token in stops:
                stopped = "eos"
                break
            tokens.append(token)
            streamer.put(token)
    finally:
        try:
            streamer.end()
        finally:
            runner.close()
    ttft = times[0] - t0
    decode_steps = len(times) - 1
    decode_s = times[-1] - times[0] if decode_steps else 0.0
    return {
        "artifact": str(folder), "target": manifest["target"], "scheme": manifest.get("scheme"),
        "runtime": runner.runtime or manifest["target"], "chat": chat, "prompt_tokens": len(ids),
        "context_length": context, "generated_tokens": len(tokens), "tokens": tokens,
        "text": tokenizer.decode(tokens, skip_special_tokens=True), "stopped": stopped,
        "ttft_ms": round(ttft * 1e3, 3),
        "decode_tok_s": round(decode_steps / decode_s, 2) if decode_steps and decode_s > 0 else None,
        "tok_s": round(len(times) / (times[-1] - t0), 2),
    }


def run(args) -> int:
    try:
        result = generate(args.artifact, args.prompt, args.max_tokens, chat=args.chat,
                          out=None if args.json else sys.stdout)
    except KeyboardInterrupt:
        # Ctrl-C: the runner is closed (generate's finally); end the line of text and stop quietly
        if not args.json:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): nothing is wrong with the generation; stop quietly
        _silence_stdout()
        return 0
    if args.json:
        try:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        return 0
    decode = f", decode {result['decode_tok_s']:.1f} tok/s" if result["decode_tok_s"] else ""
    note = {"eos": "an end-of-sequence token", "context": "the artifact's context",
            "max_tokens": "--max-tokens"}[result["stopped"]]
    print(f"[{result['generated_tokens']} tokens, {result['tok_s']:.1f} tok/s overall: TTFT "
          f"{result['ttft_ms']:.0f} ms for {result['prompt_tokens']} prompt tokens{decode}; "
          f"{result['runtime']}; stopped at {note}]", file=sys.stderr)
    return 0


def _silence_stdout():
    """After the reader of stdout has gone: point stdout at /dev/null, so that the interpreter's
    final flush does not raise again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
