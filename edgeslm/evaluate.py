"""Perplexity over a fixed number of tokens in fixed, non-overlapping context windows.

The first `num_tokens` tokens of the text are cut into windows of `context` tokens; each window is
scored independently (the first token of a window is context only), and perplexity is
exp(total NLL / predicted tokens). The same tokens and windows go to every backend, so a figure
for an exported artifact is comparable with the reference's.

Each window starts as the model is used: with the special tokens the tokenizer itself puts before
a text (Gemma's BOS, say; none for SmolLM2), which are context only and never scored.
"""

from __future__ import annotations

import math
from typing import Callable

from .errors import EdgeSLMError

DEFAULT_TOKENS = 2048
DEFAULT_CONTEXT = 512


def eval_tokens(tokenizer, text: str, num_tokens: int = DEFAULT_TOKENS):
    """The first num_tokens tokens of text (int64 [num_tokens]), without special tokens."""
    if num_tokens < 2:
        raise EdgeSLMError(f"perplexity needs at least 2 tokens (got {num_tokens})")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < num_tokens:
        raise EdgeSLMError(f"the text has {ids.numel()} tokens; {num_tokens} are needed")
    return ids[:num_tokens]


def text_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. [BOS]); [] when none."""
    if tokenizer is None:
        return []
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    return list(full[: len(full) - len(plain)]) if full[len(full) - len(plain):] == plain else []


def perplexity(logits_fn: Callable, tokens, context: int = DEFAULT_CONTEXT, progress: bool = True,
               prefix: list[int] = ()) -> dict:
    """logits_fn: [1, T] int64 -> [1, T, V] logits. Returns perplexity, nll and token counts.

    Windows hold `prefix` (context only) then context - len(prefix) text tokens, of which every one
    after the first is predicted."""
    import torch
    from tqdm.auto import tqdm

    text_len = context - len(prefix)
    if text_len < 2:
        raise EdgeSLMError(f"context must hold at least 2 tokens after {len(prefix)} special token(s)")
    head = torch.tensor(list(prefix), dtype=torch.long)
    windows = [tokens[i : i + text_len] for i in range(0, tokens.numel(), text_len)]
    windows = [w for w in windows if w.numel() > 1]
    total_nll, predicted = 0.0, 0
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = torch.cat((head, w))
        logits = logits_fn(ids.unsqueeze(0)).float()[0, len(prefix):]
        nll = torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum")
        total_nll += nll.item()
        predicted += w.numel() - 1
    return {
        "perplexity": math.exp(total_nll / predicted),
        "nll": total_nll / predicted,
        "tokens": int(tokens.numel()),
        "predicted_tokens": predicted,
        "context": context,
        "prefix_tokens": len(prefix),
    }


def decoder_logits_fn(model):
    import torch

    @torch.no_grad()
    def run(ids):
        return model(ids)[0]

    return run
