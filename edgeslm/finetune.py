"""Fine-tuning before quantization: LoRA / QLoRA through peft over our Decoder, logit distillation.

 - LoRA: peft's lora.Linear wraps our Linear (q/k/v/o and the MLP by default). peft does not know
   our module classes, so they are registered as custom modules mapped to peft's own lora.Linear,
   which only needs a base layer with in_features/out_features and a forward.
 - QLoRA: the same adapters over the frozen int4 (or int8) modules of qformat.py: a quantized
   checkpoint as MODEL, or --qlora SCHEME to quantize a float base in memory first. Gradients flow
   through the dequantize + matmul reference on the CPU (the int4 kernel's autograd on CUDA).
 - Distillation: loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T), with
   both distributions at temperature T (Hinton et al. 2015); the teacher must share the vocabulary.
 - Gradient accumulation, a tqdm bar, a resumable checkpoint (<out>.checkpoint/: adapter weights,
   AdamW moments and the step, as safetensors + JSON, no pickle), and --merge, which folds the
   adapters into float weights and writes a plain Hugging Face folder that load_model reads.

Data: .txt (packed into windows of --seq-len tokens) or .jsonl records with "text", "prompt" +
"response" (only the response is trained on) or chat "messages", formatted by the tokenizer's
chat template when it has one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .errors import EdgeSLMError

IGNORE = -100
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = DEFAULT_TARGETS
    lr: float = 5e-4
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    seed: int = 0
    qlora: str | None = None  # scheme to quantize a float base with before training
    teacher: str | None = None
    temperature: float = 2.0
    kd_alpha: float = 0.5
    save_every: int = 50
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data


def _chat(tokenizer, messages, add_generation_prompt=False) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n".join(m["content"] for m in messages)
    return text + ("\n" if add_generation_prompt else "")


def load_examples(path, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """A .txt or .jsonl file -> (input ids, labels) lists, each at most seq_len long."""
    from .data import jsonl_records, read_utf8

    path = Path(path)
    text = read_utf8(path, "data file")
    eos = tokenizer.eos_token_id
    examples = []
    if path.suffix != ".jsonl":
        ids = []
        for line in text.splitlines():
            if line.strip():
                ids += tokenizer(line, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        for i in range(0, len(ids) - 1, seq_len):
            chunk = ids[i : i + seq_len]
            if len(chunk) > 1:
                examples.append((chunk, list(chunk)))
        return examples
    for n, record in jsonl_records(path, text):
        if isinstance(record.get("messages"), list):
            msgs = record["messages"]
            if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                   and isinstance(m.get("content"), str) for m in msgs):
                raise EdgeSLMError(f"{path}:{n}: 'messages' must be a list of {{role, content}} strings")
            ids = tokenizer(_chat(tokenizer, msgs), add_special_tokens=False).input_ids
            labels = list(ids)
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            user = [{"role": "user", "content": record["prompt"]}]
            prompt = tokenizer(_chat(tokenizer, user, add_generation_prompt=True), add_special_tokens=False).input_ids
            full_text = _chat(tokenizer, user + [{"role": "assistant", "content": record["response"]}])
            ids = tokenizer(full_text, add_special_tokens=False).input_ids
            if not getattr(tokenizer, "chat_template", None) and eos is not None:
                ids = ids + [eos]
            keep = len(prompt) if ids[: len(prompt)] == prompt else 0
            labels = [IGNORE] * keep + ids[keep:]
        elif isinstance(record.get("text"), str):
            ids = tokenizer(record["text"], add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
            labels = list(ids)
        else:
            raise EdgeSLMError(f"{path}:{n} has none of 'text', 'prompt'+'response' or 'messages'")
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(ids) > 1 and any(lab != IGNORE for lab in labels[1:]):
            examples.append((ids, labels))
    if not examples:
        raise EdgeSLMError(f"{path} holds no usable training example")
    return examples


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


# ---------------------------------------------------------------- adapters through peft


def add_lora(model, cfg: FinetuneConfig):
    """Injects peft LoRA layers into our Decoder in place; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from .model import Linear
    from .qformat import Int4Linear, Int8Linear

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      bias="none")
    lcfg._register_custom_module({Linear: LoraLinear, Int4Linear: LoraLinear, Int8Linear: LoraLinear})
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        model = inject_adapter_in_model(lcfg, model)
    except ValueError as e:
        raise EdgeSLMError(f"cannot place LoRA adapters: {e}") from None
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise EdgeSLMError(f"no module matches the LoRA targets {', '.join(cfg.targets)}")
    return model


def lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def load_adapters(model, path):
    """Copies adapter.safetensors (as finetune writes it) into a model that add_lora prepared."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved = load_file(Path(path))
    missing = sorted(set(n for n in params if "lora_" in n) - set(saved))
    if missing or not saved.keys() <= params.keys():
        raise EdgeSLMError(f"{path} does not fit this model's adapters (missing {missing[:2]})")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def merge_adapters(model):
    """Folds every adapter into a float Linear (dequantizing an int4/int8 base) and turns a
    quantized embedding back into a float one: the result is a plain float Decoder."""
    from .model import Embedding, Linear
    from .qformat import Int4Embedding, Int8Embedding, _parent

    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        w = base.weight.detach().float() if isinstance(base, Linear) else base.dequantized(torch.float32)
        for adapter in layer.active_adapters:
            w = w + layer.get_delta_weight(adapter).float()
        new = Linear(base.in_features, base.out_features, base.bias is not None)
        new.weight = torch.nn.Parameter(w)
        if base.bias is not None:
            new.bias = torch.nn.Parameter(base.bias.detach().float())
        parent, attr = _parent(model, name)
        setattr(parent, attr, new)
    for name, m in list(model.named_modules()):
        if isinstance(m, (Int4Embedding, Int8Embedding)):
            table = Embedding(*m.dequantized().shape)
            table.weight = torch.nn.Parameter(m.dequantized(torch.float32))
            parent, attr = _parent(model, name) if "." in name else (model, name)
            setattr(parent, attr, table)
        elif name and type(m).__name__ in ("Int4Linear", "Int8Linear"):  # an untargeted quantized linear
            lin = Linear(m.in_features, m.out_features, m.bias is not None)
            lin.weight = torch.nn.Parameter(m.dequantized(torch.float32))
            if m.bias is not None:
                lin.bias = torch.nn.Parameter(m.bias.detach().float())
            parent, attr = _parent(model, name)
            setattr(parent, attr, lin)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.float()


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameter names -> transformers' (the inverse of loading.hf_to_decoder_names)."""
    spec = model.spec
    gemma = spec.sandwich_norms
    norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
             "mlp_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
             "mlp_post_norm": "post_feedforward_layernorm"}
    fused = spec.family == "phi3"
    out = {}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if name.startswith("inv_freq"):
            continue
        if name.startswith("lm_head."):
            out[name] = t
            continue
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] in norms:
            parts[2] = norms[parts[2]]
        out["model." + ".".join(parts)] = t
    if fused:
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            for suffix in ("weight", "bias"):
                qkv = [out.pop(f"{p}.self_attn.{x}_proj.{suffix}", None) for x in "qkv"]
                if qkv[0] is not None:
                    out[f"{p}.self_attn.qkv_proj.{suffix}"] = torch.cat(qkv)
                gu = [out.pop(f"{p}.mlp.{x}_proj.{suffix}", None) for x in ("gate", "up")]
                if gu[0] is not None:
                    out[f"{p}.mlp.gate_up_proj.{suffix}"] = torch.cat(gu)
    return out


def save_hf_folder(model, tokenizer, out: Path):
    """A float Decoder -> config.json + model.safetensors (+ tokenizer) that load_model reads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    config = model.hf_config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------- the loss


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) over the positions that have a label."""
    s, t, y = student_logits[:, :-1].float(), teacher_logits[:, :-1].float(), labels[:, 1:]
    mask = y != IGNORE
    ce = F.cross_entropy(s[mask], y[mask])
    kl = F.kl_div(F.log_softmax(s[mask] / temperature, -1), F.log_softmax(t[mask] / temperature, -1),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature**2 * kl, ce


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


# ---------------------------------------------------------------- checkpoint


def _save_checkpoint(folder: Path, model, optimizer, step: int, losses: list, cfg: FinetuneConfig):
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapter_state(model), tmp / "adapter.safetensors")
    moments = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    moments[f"{names[id(p)]}::{key}"] = st[key].contiguous()
    opt_step = next((float(s["step"]) for s in optimizer.state.values() if "step" in s), 0.0)
    save_file(moments, tmp / "optimizer.safetensors")
    save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer_step": opt_step, "losses": losses,
                                                "config": asdict(cfg)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load_checkpoint(folder: Path, model, optimizer, cfg: FinetuneConfig):
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        adapters = load_file(folder / "adapter.safetensors")
        moments = load_file(folder / "optimizer.safetensors")
        rng = load_file(folder / "rng.safetensors")["cpu"]
    except Exception as e:  # any unreadable piece means the checkpoint cannot be trusted
        raise EdgeSLMError(f"{folder} is not a readable fine-tuning checkpoint ({type(e).__name__})") from None
    saved = state["config"]
    for key in ("rank", "targets", "qlora", "batch_size", "grad_accum", "seq_len", "seed"):
        if (list(saved[key]) if key == "targets" else saved[key]) != (list(getattr(cfg, key)) if key == "targets" else getattr(cfg, key)):
            raise EdgeSLMError(f"{folder} was written with {key}={saved[key]!r}; rerun with the same options or delete it")
    params = dict(model.named_parameters())
    for n, t in adapters.items():
        params[n].data.copy_(t)
    for n, p in params.items():
        if f"{n}::exp_avg" in moments:
            optimizer.state[p] = {"step": torch.tensor(state["optimizer_step"]),
                                  "exp_avg": moments[f"{n}::exp_avg"], "exp_avg_sq": moments[f"{n}::exp_avg_sq"]}
    torch.set_rng_state(rng)  # dropout masks continue as in an uninterrupted run
    return state["step"], state["losses"]


# ---------------------------------------------------------------- the loop


def finetune(model_name, data, out, cfg: FinetuneConfig, merge: bool = False, resume: bool = False,
             force: bool = False, progress: bool = True) -> dict:
    from .artifact import atomic_folder
    from .loading import load_model
    from .quantize import quantize_model
    from .schemes import get_scheme

    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    for name, value, lo in (("rank", cfg.rank, 1), ("batch size", cfg.batch_size, 1),
                            ("grad accumulation", cfg.grad_accum, 1), ("seq len", cfg.seq_len, 2)):
        if value < lo:
            raise EdgeSLMError(f"{name} must be at least {lo}")
    if not 0.0 <= cfg.kd_alpha <= 1.0 or cfg.temperature <= 0 or not 0.0 <= cfg.dropout < 1.0:
        raise EdgeSLMError("need 0 <= kd alpha <= 1, temperature > 0 and 0 <= dropout < 1")
    scheme = get_scheme(cfg.qlora) if cfg.qlora else None
    if scheme is not None and scheme.bits != 4:
        raise EdgeSLMError(f"--qlora needs an int4 scheme, not {scheme.name}")
    torch.manual_seed(cfg.seed)
    model, tok, folder = load_model(model_name)
    examples = load_examples(data, tok, cfg.seq_len)
    teacher = None
    if cfg.teacher:
        teacher, ttok, _ = load_model(cfg.teacher)
        if teacher.spec.vocab_size != model.spec.vocab_size or ttok.get_vocab() != tok.get_vocab():
            raise EdgeSLMError(f"the teacher's vocabulary ({teacher.spec.vocab_size} tokens) differs from the "
                               f"student's ({model.spec.vocab_size}); distillation needs the same tokenizer")
        teacher.eval()
    if scheme is not None:
        from .qformat import is_quantized_folder

        if is_quantized_folder(folder):
            raise EdgeSLMError(f"{folder} is already quantized; drop --qlora (QLoRA runs over it as it is)")
        quantize_model(model, scheme, None if not scheme.needs_calibration else _calibration(tok), progress=progress)
    quantized_base = any(type(m).__name__ in ("Int4Linear", "Int8Linear") for m in model.modules())
    model = add_lora(model, cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.steps or max(1, math.ceil(len(examples) * cfg.epochs / per_step))
    ckpt = out.with_name(out.name + ".checkpoint")
    step, losses = 0, []
    if resume and (ckpt / "state.json").is_file():
        step, losses = _load_checkpoint(ckpt, model, optimizer, cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc="finetune", unit="step", disable=not progress)
    while step < steps:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            ids, labels = collate(_batch(examples, cfg, step * cfg.grad_accum + micro), pad)
            logits = model(ids)[0]
            if teacher is not None:
                with torch.no_grad():
                    tlogits = teacher(ids)[0]
                loss, _ = distill_loss(logits, tlogits, labels, cfg.temperature, cfg.kd_alpha)
            else:
                loss = lm_loss(logits, labels)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        optimizer.step()
        step += 1
        losses.append(round(total, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % cfg.save_every == 0 or step == steps:
            _save_checkpoint(ckpt, model, optimizer, step, losses, cfg)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    facts = {"model": str(folder), "data": str(data), "out": str(out), "examples": len(examples), "steps": steps,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "losses": losses, "qlora": quantized_base, "teacher": cfg.teacher, "merged": merge,
             "trainable_parameters": sum(p.numel() for p in trainable), "seconds": round(seconds, 1),
             "config": asdict(cfg)}
    from safetensors.torch import save_file

    with atomic_folder(out, force=force) as tmp:
        save_file(adapter_state(model), tmp / "adapter.safetensors")
        if merge:
            save_hf_folder(merge_adapters(model), tok, tmp)
        (tmp / "finetune.json").write_text(json.dumps(facts, indent=2))
    # the checkpoint stays: --resume with a larger --steps trains on from it
    return facts


def _batch(examples, cfg: FinetuneConfig, index: int):
    """Micro-batch `index` of a seeded shuffle per epoch: the same on a resumed run."""
    n = len(examples)
    first = index * cfg.batch_size
    out = []
    for j in range(first, first + cfg.batch_size):
        epoch, pos = divmod(j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        out.append(examples[order[pos]])
    return out


def _calibration(tok):
    from .quantize import calibration_tokens

    return calibration_tokens(tok)
