"""Perplexity over a fixed number of tokens in fixed, non-overlapping context windows.

The first `num_tokens` tokens of the text are cut into windows of `context` tokens; each window is
scored independently (the first token of a window is context only), and perplexity is
exp(total NLL / predicted tokens). The same tokens and windows go to every backend, so a figure
for an exported artifact is comparable with the reference's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import EdgeSLMError

DEFAULT_TOKENS = 2048
DEFAULT_CONTEXT = 512


def eval_tokens(tokenizer, text: str, num_tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < num_tokens:
        raise EdgeSLMError(f"the text has {ids.numel()} tokens; {num_tokens} are needed")
    return ids[:num_tokens]


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    context: int = DEFAULT_CONTEXT,
    progress: bool = True,
) -> dict:
    """logits_fn: [1, T] int64 -> [1, T, V] logits. Returns perplexity, nll and token counts."""
    if context < 2:
        raise EdgeSLMError("context must be at least 2 tokens")
    windows = [tokens[i : i + context] for i in range(0, tokens.numel(), context)]
    windows = [w for w in windows if w.numel() > 1]
    total_nll, predicted = 0.0, 0
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        logits = logits_fn(w.unsqueeze(0)).float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum")
        total_nll += nll.item()
        predicted += w.numel() - 1
    return {
        "perplexity": math.exp(total_nll / predicted),
        "nll": total_nll / predicted,
        "tokens": int(tokens.numel()),
        "predicted_tokens": predicted,
        "context": context,
    }


def decoder_logits_fn(model):
    @torch.no_grad()
    def run(ids):
        return model(ids)[0]

    return run
