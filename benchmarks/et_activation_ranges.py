"""What XNNPACK's 8-bit dynamic activations cost the ExecuTorch int4 target, simulated in PyTorch.

    python benchmarks/et_activation_ranges.py [--scheme q4g32-gptq] [--tokens 2048] [--json]

XNNPACK's qd8 quantizes each row of a linear's input to int8 with one asymmetric range that
includes 0 (checked equal to a .pte on single linears of every SmolLM2 shape to ~2e-6). This
script applies that rounding to the input of every int4 linear of the quantized reference (and
of the tied lm_head) and reads Brown test perplexity for:
  weight-only   no activation rounding: the int4 reference every target is verified against
  one range     one int8 range per token: the plain 8da4w export
  range bins    one range per token and bin of input groups, the bins export uses
                (targets/executorch.py: input_group_ranges + range_bins, the same calibration)
  per group     one range per token and group of 32: the finest split possible
  smoothed      the export's rule: the inputs of q/k/v, gate/up and o_proj divided by
                power_of_two(group max) (one range per token), down_proj and the lm_head in range
                bins (o_proj here takes one power of two per group, the export one per kv head)
  all smoothed  every input divided by power_of_two(group max), one range per token
The scales are the reference's (already bf16-exact, see schemes.int4.scale_grid). Prints a table or JSON.
"""

from __future__ import annotations

import argparse
import json

import torch


def qd8(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK's dynamic int8 quantization of each row, dequantized again."""
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / 255).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-128 - lo / scale).clamp(-128, 127)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def rounded_by_groups(x: torch.Tensor, group_sets: list[torch.Tensor], group: int) -> torch.Tensor:
    """qd8 applied separately to the channels of each set of K groups."""
    out = torch.empty_like(x)
    for groups in group_sets:
        channels = (groups[:, None] * group + torch.arange(group)).flatten()
        out[..., channels] = qd8(x[..., channels])
    return out


def main(argv=None):
    from edgeslm import data, evaluate
    from edgeslm.loading import load_model
    from edgeslm.schemes.int4 import Int4Embedding, Int4Linear
    from edgeslm.quantizer import reference_folder
    from edgeslm.schemes import DEFAULT_SCHEME, get_scheme
    from edgeslm.targets.executorch import calibration_for, input_group_ranges, power_of_two, range_bins

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default=DEFAULT_SCHEME)
    ap.add_argument("--tokens", type=int, default=2048, help="Brown test tokens (default %(default)s)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    model, tok, _ = load_model(reference_folder(None, get_scheme(args.scheme)))
    ids = evaluate.eval_tokens(tok, data.load_eval_text("brown:test"), args.tokens)
    ranges = input_group_ranges(model, calibration_for(model, tok, 512))
    modules = list(ranges)
    names = {m: n for n, m in model.named_modules() if m in ranges}
    groups_of = {m: torch.arange(m.in_features // m.group_size) for m in modules}
    binned = {m for m in modules if isinstance(m, Int4Embedding) or "down_proj" in names[m]}
    modes = {
        "weight-only": None,
        "one range": {m: [groups_of[m]] for m in modules},
        "range bins": {m: range_bins(ranges[m]) for m in modules},
        "per group": {m: [g[None] for g in groups_of[m]] for m in modules},
        "smoothed": {m: range_bins(ranges[m]) if m in binned else ([groups_of[m]], power_of_two(ranges[m]))
                     for m in modules},
        "all smoothed": {m: ([groups_of[m]], power_of_two(ranges[m])) for m in modules},
    }

    active = {}

    def round_input(module, x):
        sets = active.get(module)
        if isinstance(sets, tuple):  # (sets, power of two per group): divided out, rounded, multiplied back
            sets, s = sets
            s = s.repeat_interleave(module.group_size)
            return rounded_by_groups(x / s, sets, module.group_size) * s
        return x if sets is None else rounded_by_groups(x, sets, module.group_size)

    handles = [m.register_forward_pre_hook(lambda mod, a: (round_input(mod, a[0]),))
               for m in modules if type(m) is Int4Linear]
    table = model.embed_tokens
    if isinstance(table, Int4Embedding) and table in ranges:  # the tied lm_head: project() is no forward
        project = table.project
        table.project = lambda h: project(round_input(table, h))
    rows = []
    try:
        for name, sets in modes.items():
            active = sets or {}
            ppl = evaluate.perplexity(evaluate.decoder_logits_fn(model), ids, progress=not args.json)["perplexity"]
            rows.append({"mode": name, "perplexity": ppl, "int8_ranges_per_token":
                         sum(len(s[0] if isinstance(s, tuple) else s) for s in sets.values()) if sets else 0})
    finally:
        for h in handles:
            h.remove()
    base = rows[0]["perplexity"]
    for r in rows:
        r["vs_weight_only"] = r["perplexity"] / base - 1
    result = {"scheme": args.scheme, "tokens": args.tokens, "linears": len(modules), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.scheme}, Brown test {args.tokens} tokens, {len(modules)} int4 linears")
        for r in rows:
            print(f"  {r['mode']:12s} {r['perplexity']:8.3f}  {100 * r['vs_weight_only']:+6.2f}%  "
                  f"ranges/token {r['int8_ranges_per_token']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
