"""edgeslm finetune: LoRA / QLoRA (peft) and logit distillation over the reference decoder."""

from __future__ import annotations

from ..finetune_config import DEFAULT_TARGETS, FinetuneConfig
from .common import add_json_argument, add_model_argument, emit

HELP = "LoRA / QLoRA fine-tuning and logit distillation; --merge writes a plain float model folder"


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--data", required=True,
                   help=".txt (packed into --seq-len windows) or .jsonl with text, prompt+response or chat messages")
    p.add_argument("--out", required=True, help="output folder: adapter.safetensors + finetune.json (+ the merged model)")
    d = FinetuneConfig()
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (default %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout (default %(default)s)")
    g.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="module names to adapt (default: %(default)s)")
    g.add_argument("--qlora", nargs="?", const="q4g32-rtn", default=None, metavar="SCHEME",
                   help="quantize the float base in memory with this int4 scheme and train over the frozen int4 "
                        "modules (default q4g32-rtn when given bare); a quantized MODEL folder is QLoRA already")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per micro-batch in each process (default %(default)s); a step sees "
                        "batch size x grad accum x processes sequences")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between resumable checkpoints in OUT.checkpoint/ (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint/ when it exists")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, help="teacher model (same vocabulary); enables logit distillation")
    g.add_argument("--temperature", type=float, default=d.temperature, help="KL temperature T (default %(default)s)")
    g.add_argument("--kd-alpha", type=float, default=d.kd_alpha,
                   help="weight of the CE term; KL gets 1 - alpha (default %(default)s)")
    g = p.add_argument_group("several processes (torchrun --nproc_per_node N -m edgeslm.cli.main finetune ..., "
                             "or accelerate launch)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across the processes (FSDP, one unit per "
                        "decoder layer) instead of replicating the model on each (DDP, the default)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the model and adapters while training (default %(default)s; bf16 on GPUs)")
    p.add_argument("--merge", action="store_true", help="fold the adapters into float weights and write a model folder")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_argument(p)


def run(args) -> int:
    cfg = FinetuneConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                         targets=tuple(t for t in args.targets.split(",") if t), lr=args.lr, steps=args.steps,
                         epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, seed=args.seed, qlora=args.qlora, teacher=args.teacher,
                         temperature=args.temperature, kd_alpha=args.kd_alpha, save_every=args.save_every,
                         allow_pickle=args.allow_pickle)
    from ..finetune import finetune

    facts = finetune(args.model, args.data, args.out, cfg, merge=args.merge, resume=args.resume,
                     force=args.force, progress=not args.no_progress, fsdp=args.fsdp, dtype=args.dtype)
    if facts["rank"] != 0:  # under a launcher only the first process reports
        return 0
    if not args.json:
        facts = dict(facts)
    emit(facts, args.json, lambda r: print(
        f"{r['steps']} steps over {r['examples']} examples in {r['seconds']} s"
        f"{' on ' + str(r['processes']) + ' processes (' + r['parallel'].upper() + ')' if r['parallel'] else ''}"
        f"{' (QLoRA over the quantized base)' if r['qlora'] else ''}{' distilled from ' + r['teacher'] if r['teacher'] else ''}: "
        f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}; {r['trainable_parameters']:,} trainable parameters\n"
        f"wrote {r['out']}{' (merged float model)' if r['merged'] else ' (adapters)'}"))
    return 0
