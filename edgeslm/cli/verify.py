"""edgeslm verify: re-check an artifact's hashes and its parity with the reference decoder."""

from __future__ import annotations

from .common import add_json_argument, emit

HELP = "check an artifact folder: sha256 of every file, then greedy tokens, logits and perplexity vs the reference"


def add_arguments(p):
    p.add_argument("folder", help="an artifact folder written by 'edgeslm export'")
    p.add_argument("--steps", type=int, default=None,
                   help="greedy steps (default 64; with sliding windows the prompt itself is longer than the window)")
    p.add_argument("--reference", metavar="MODEL", default=None,
                   help="the model or quantized checkpoint to compare against, when the manifest's reference "
                        "folder is not on this machine (a copied artifact)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a *.bin pickle reference checkpoint (unsafe)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="Brown test tokens for perplexity (default up to 2048)")
    add_json_argument(p)


def run(args) -> int:
    from ..parity import render, verify_folder

    result = verify_folder(args.folder, steps=args.steps, ppl_count=args.ppl_tokens, progress=not args.json,
                           raise_on_failure=False, reference=args.reference, allow_pickle=args.allow_pickle)
    emit(result, args.json, lambda r: print(render(r)))
    return 0 if result["passed"] else 1
