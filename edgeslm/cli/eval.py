"""edgeslm eval: perplexity on the Brown corpus or a local text file."""

from __future__ import annotations

from ..errors import EdgeSLMError
from ..evaluate import DEFAULT_CONTEXT, DEFAULT_TOKENS
from .common import DTYPE_NAMES, add_json_argument, add_model_argument, emit

HELP = "perplexity of a model on the Brown corpus (default: test split) or a text/JSONL file"


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--data", default="brown:test", help="brown:test|brown:valid|brown:train or a .txt/.jsonl path")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens scored (default %(default)s)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="window length (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    add_json_argument(p)


def run(args) -> int:
    import torch

    from ..data import load_eval_text
    from ..evaluate import decoder_logits_fn, eval_tokens, perplexity, text_prefix
    from ..loading import load_model, torch_dtype

    if args.tokens < 2 or args.context < 2:
        raise EdgeSLMError(f"--tokens and --context must be at least 2 (got {args.tokens}, {args.context})")
    torch.manual_seed(0)
    model, tok, folder = load_model(args.model, dtype=torch_dtype(args.dtype), allow_pickle=args.allow_pickle)
    tokens = eval_tokens(tok, load_eval_text(args.data), args.tokens)
    result = perplexity(decoder_logits_fn(model), tokens, args.context, prefix=text_prefix(tok))
    result.update(model=str(folder), data=args.data, dtype=args.dtype, backend="edgeslm reference decoder",
                  scheme=checkpoint_scheme(folder, args.dtype))
    emit(result, args.json, lambda r: print(
        f"perplexity {r['perplexity']:.3f} ({r['scheme']}) over {r['tokens']} tokens of {r['data']} (context {r['context']})"))
    return 0


def checkpoint_scheme(folder, dtype: str) -> str:
    """The scheme of a quantized checkpoint (from its quant.json), else the float type it ran in."""
    import json

    from ..qformat import is_quantized_folder

    if is_quantized_folder(folder):
        return json.loads((folder / "quant.json").read_text())["scheme"]
    return {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[dtype]
