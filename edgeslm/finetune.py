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
   AdamW moments, each rank's RNG state and the step, as safetensors + JSON, no pickle), and
   --merge, which folds the adapters into float weights and writes a plain Hugging Face folder that
   load_model reads.
 - Several processes: under torchrun or `accelerate launch` (which set RANK / WORLD_SIZE) the same
   command joins a torch.distributed group (gloo on CPU, nccl on CUDA) and wraps the model in DDP,
   or shards it with FSDP (fully_shard per decoder layer) with --fsdp. Every rank draws the same
   global micro-batch and trains on its slice, and the loss is the mean over every labelled token
   of the step, so N processes x batch B follow the same curve as 1 process x batch N*B. Rank 0
   writes the checkpoint (atomically) and the output; a checkpoint records its world size and
   resumes only under the same one.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .errors import EdgeSLMError

from .finetune_config import DEFAULT_TARGETS, FinetuneConfig  # noqa: F401 (the CLI and recipes use them)

IGNORE = -100


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
    from .schemes.base import QuantizedLinear

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      bias="none")
    lcfg._register_custom_module({Linear: LoraLinear, QuantizedLinear: LoraLinear})
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
    from .qformat import _parent
    from .schemes.base import QuantizedEmbedding, QuantizedLinear

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
        if isinstance(m, QuantizedEmbedding):
            table = Embedding(*m.dequantized().shape)
            table.weight = torch.nn.Parameter(m.dequantized(torch.float32))
            parent, attr = _parent(model, name) if "." in name else (model, name)
            setattr(parent, attr, table)
        elif name and isinstance(m, QuantizedLinear):  # an untargeted quantized linear
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
    """Our parameter names -> transformers' (names.py, the table loading reads them with)."""
    from .names import ours_to_hf

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return ours_to_hf(state, model.spec, fuse=model.spec.fused_projections)


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


# ---------------------------------------------------------------- processes: one, or many under a launcher


@dataclass
class Processes:
    """This process's place in the launch: torchrun and `accelerate launch` both set RANK, WORLD_SIZE
    and LOCAL_RANK (and MASTER_ADDR/PORT), which torch.distributed's env:// initialization reads."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def start_processes() -> Processes:
    """Joins the process group when a launcher started this process (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not torch.distributed.is_initialized():
        import datetime

        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Processes(rank=rank, world=world, local_rank=local, device=device)


def stop_processes(procs: Processes):
    if procs.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this rank's shard for an FSDP parameter, the tensor otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


def wrap_model(model, procs: Processes, fsdp: bool):
    """DDP (every rank holds the whole model, gradients are averaged) or FSDP (fully_shard per
    decoder layer, then the root: each rank holds a slice of every parameter)."""
    if not procs.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[procs.local_rank] if procs.device.startswith("cuda") else None)


def unwrap(model):
    return getattr(model, "module", model)


# ---------------------------------------------------------------- checkpoint


def _gather_state(model, optimizer):
    """-> (adapters, AdamW moments, AdamW step), whole tensors on the CPU, named as in the unwrapped model."""
    adapters, moments = {}, {}
    for name, p in unwrap(model).named_parameters():
        if "lora_" not in name:
            continue
        adapters[name] = _full(p)
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                moments[f"{name}::{key}"] = _full(st[key])
    opt_step = next((float(s["step"]) for s in optimizer.state.values() if "step" in s), 0.0)
    return adapters, moments, opt_step


def _save_checkpoint(folder: Path, model, optimizer, step: int, losses: list, cfg: FinetuneConfig,
                     procs: Processes):
    """Every rank gathers (FSDP shards are collectives); rank 0 writes a temporary sibling and renames
    it into place, so a rank killed at any moment leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    adapters, moments, opt_step = _gather_state(model, optimizer)
    rng = procs.gather_objects(torch.get_rng_state())
    if procs.main:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(adapters, tmp / "adapter.safetensors")
        save_file(moments, tmp / "optimizer.safetensors")
        save_file({f"rank{r}": t for r, t in enumerate(rng)}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer_step": opt_step, "losses": losses,
                                                    "world_size": procs.world, "config": asdict(cfg)}, indent=2))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():  # at every moment one complete checkpoint exists: folder, or old
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    procs.barrier()


def _read_checkpoint(folder: Path, cfg: FinetuneConfig, procs: Processes):
    """Reads and checks a checkpoint without changing anything (nor the folder itself)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        adapters = load_file(folder / "adapter.safetensors")
        moments = load_file(folder / "optimizer.safetensors")
        rng = load_file(folder / "rng.safetensors")
    except Exception as e:  # any unreadable piece means the checkpoint cannot be trusted
        raise EdgeSLMError(f"{folder} is not a readable fine-tuning checkpoint ({type(e).__name__})") from None
    saved_world = int(state.get("world_size", 1))
    if saved_world != procs.world:
        raise EdgeSLMError(f"{folder} was written by {saved_world} process(es) and this launch has {procs.world}: "
                           f"relaunch with {saved_world} (torchrun --nproc_per_node {saved_world}) to resume it, or "
                           "delete it to start over")
    saved = state["config"]
    for key in ("rank", "targets", "qlora", "batch_size", "grad_accum", "seq_len", "seed"):
        if (list(saved[key]) if key == "targets" else saved[key]) != (list(getattr(cfg, key)) if key == "targets" else getattr(cfg, key)):
            raise EdgeSLMError(f"{folder} was written with {key}={saved[key]!r}; rerun with the same options or delete it")
    return state, adapters, moments, rng.get(f"rank{procs.rank}", rng.get("cpu"))


def _apply_checkpoint(model, optimizer, checkpoint):
    state, adapters, moments, rng = checkpoint
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for n, t in adapters.items():
            p = params[n]
            local = _like(p, t)
            p.copy_(local)
    for n, p in params.items():
        if f"{n}::exp_avg" in moments:
            optimizer.state[p] = {"step": torch.tensor(state["optimizer_step"]),
                                  "exp_avg": _like(p, moments[f"{n}::exp_avg"]),
                                  "exp_avg_sq": _like(p, moments[f"{n}::exp_avg_sq"])}
    if rng is not None:
        torch.set_rng_state(rng)  # dropout masks continue as in an uninterrupted run
    return state["step"], state["losses"]


# ---------------------------------------------------------------- the loop


def finetune(model_name, data, out, cfg: FinetuneConfig, merge: bool = False, resume: bool = False,
             force: bool = False, progress: bool = True, fsdp: bool = False, dtype: str = "fp32") -> dict:
    """LoRA / QLoRA / distillation in this process, or in every process of a torchrun / `accelerate
    launch` group (DDP, or FSDP with fsdp=True); rank 0 writes the checkpoint and the output."""
    procs = start_processes()
    try:
        return _finetune(model_name, data, out, cfg, merge, resume, force, progress, fsdp, dtype, procs)
    finally:
        stop_processes(procs)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check_settings(out: Path, cfg, force, fsdp, dtype, procs: Processes):
    """Refuses settings that cannot work, before any loading or writing; returns the QLoRA scheme."""
    from .schemes import get_scheme

    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    for name, value, lo in (("rank", cfg.rank, 1), ("batch size", cfg.batch_size, 1),
                            ("grad accumulation", cfg.grad_accum, 1), ("seq len", cfg.seq_len, 2)):
        if value < lo:
            raise EdgeSLMError(f"{name} must be at least {lo}")
    if not 0.0 <= cfg.kd_alpha <= 1.0 or cfg.temperature <= 0 or not 0.0 <= cfg.dropout < 1.0:
        raise EdgeSLMError("need 0 <= kd alpha <= 1, temperature > 0 and 0 <= dropout < 1")
    if dtype not in DTYPES:
        raise EdgeSLMError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    scheme = get_scheme(cfg.qlora) if cfg.qlora else None
    if scheme is not None and not scheme.quantized:
        raise EdgeSLMError(f"--qlora needs a quantized scheme, not {scheme.name}")
    if fsdp and not procs.distributed:
        raise EdgeSLMError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                           "(or accelerate launch) and N >= 2")
    return scheme


def _resumable_checkpoint(ckpt: Path, cfg, procs: Processes):
    # a launch killed between the two renames of _save_checkpoint left the previous one as .old
    for candidate in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (candidate / "state.json").is_file():
            return _read_checkpoint(candidate, cfg, procs)  # refused before any training or writing
    return None


def _prepare_models(model, tok, folder, cfg, dtype, scheme, procs: Processes, progress):
    """(student with LoRA adapters, teacher or None, whether the student's base is quantized)."""
    from .loading import load_model
    from .qformat import is_quantized_folder
    from .quantizer import quantize_model
    from .schemes.base import QuantizedLinear

    teacher = None
    if cfg.teacher:
        teacher, ttok, _ = load_model(cfg.teacher, dtype=DTYPES[dtype], allow_pickle=cfg.allow_pickle)
        if teacher.spec.vocab_size != model.spec.vocab_size or ttok.get_vocab() != tok.get_vocab():
            raise EdgeSLMError(f"the teacher's vocabulary ({teacher.spec.vocab_size} tokens) differs from the "
                               f"student's ({model.spec.vocab_size}); distillation needs the same tokenizer")
        teacher.eval().to(procs.device)
    if scheme is not None:
        if is_quantized_folder(folder):
            raise EdgeSLMError(f"{folder} is already quantized; drop --qlora (QLoRA runs over it as it is)")
        quantize_model(model, scheme, None if not scheme.needs_calibration else _calibration(tok), progress=progress)
    quantized_base = any(isinstance(m, QuantizedLinear) for m in model.modules())
    return add_lora(model, cfg).to(procs.device), teacher, quantized_base


def _train_step(model, teacher, optimizer, examples, cfg, step, pad, procs: Processes, fsdp) -> float:
    """One optimizer step over grad_accum micro-batches; returns the step's loss over all ranks."""
    global_batch = cfg.batch_size * procs.world  # sequences per micro-batch over all ranks
    optimizer.zero_grad(set_to_none=True)
    # each rank takes its slice of every global micro-batch; the loss is the mean over every labelled
    # token of the step (all micro-batches, all ranks), so N ranks x batch B == 1 rank x batch N*B
    micro = [_batch(examples, cfg, step * cfg.grad_accum + m, global_batch) for m in range(cfg.grad_accum)]
    step_tokens = sum(_labelled(b) for b in micro)
    total = 0.0
    for m, batch in enumerate(micro):
        mine = batch[procs.rank * cfg.batch_size : (procs.rank + 1) * cfg.batch_size]
        ids, labels = collate(mine, pad)
        ids, labels = ids.to(procs.device), labels.to(procs.device)
        n = _labelled(mine)
        with _gradient_sync(model, procs, fsdp, last=m == cfg.grad_accum - 1):
            logits = model(ids)[0]
            if teacher is not None:
                with torch.no_grad():
                    tlogits = teacher(ids)[0]
                loss, _ = distill_loss(logits, tlogits, labels, cfg.temperature, cfg.kd_alpha) if n else (None, None)
            else:
                loss = lm_loss(logits, labels) if n else None
            # a rank whose slice has no label still joins the gradient reduction, with zero
            weighted = loss * (n / step_tokens) if loss is not None else logits.sum() * 0.0
            (weighted * procs.world).backward()  # DDP and FSDP average gradients over ranks
        total += float(weighted.detach())
    optimizer.step()
    return procs.sum(total)


def _finetune(model_name, data, out, cfg, merge, resume, force, progress, fsdp, dtype, procs: Processes) -> dict:
    from .artifact import atomic_folder
    from .loading import load_model

    out = Path(out)
    scheme = _check_settings(out, cfg, force, fsdp, dtype, procs)
    ckpt = out.with_name(out.name + ".checkpoint")
    checkpoint = _resumable_checkpoint(ckpt, cfg, procs) if resume else None
    progress = progress and procs.main
    torch.manual_seed(cfg.seed)
    model, tok, folder = load_model(model_name, dtype=DTYPES[dtype], allow_pickle=cfg.allow_pickle)
    examples = load_examples(data, tok, cfg.seq_len)
    model, teacher, quantized_base = _prepare_models(model, tok, folder, cfg, dtype, scheme, procs, progress)
    if procs.distributed:
        torch.manual_seed(cfg.seed + 1000 * procs.rank)  # each rank its own dropout masks, the same LoRA init
    model.train()
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = wrap_model(model, procs, fsdp)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    per_step = cfg.batch_size * procs.world * cfg.grad_accum
    steps = cfg.steps or max(1, math.ceil(len(examples) * cfg.epochs / per_step))
    step, losses = _apply_checkpoint(model, optimizer, checkpoint) if checkpoint is not None else (0, [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc="finetune", unit="step", disable=not progress)
    while step < steps:
        total = _train_step(model, teacher, optimizer, examples, cfg, step, pad, procs, fsdp)
        step += 1
        losses.append(round(total, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % cfg.save_every == 0 or step == steps:
            _save_checkpoint(ckpt, model, optimizer, step, losses, cfg, procs)
    bar.close()
    seconds = time.perf_counter() - start
    adapters, _, _ = _gather_state(model, optimizer)
    facts = {"model": str(folder), "data": str(data), "out": str(out), "examples": len(examples), "steps": steps,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "losses": losses, "qlora": quantized_base, "teacher": cfg.teacher, "merged": merge,
             "trainable_parameters": trainable_count, "seconds": round(seconds, 1),
             "processes": procs.world, "parallel": ("fsdp" if fsdp else "ddp") if procs.distributed else None,
             "effective_batch": per_step, "dtype": dtype, "rank": procs.rank, "config": asdict(cfg)}
    if procs.main:
        from safetensors.torch import save_file

        with atomic_folder(out, force=force) as tmp:
            save_file(adapters, tmp / "adapter.safetensors")
            if merge:
                save_hf_folder(merge_adapters(_merge_base(model, adapters, model_name, cfg, scheme, DTYPES[dtype],
                                                          fsdp)), tok, tmp)
            (tmp / "finetune.json").write_text(json.dumps(facts, indent=2))
    procs.barrier()
    # the checkpoint stays: --resume with a larger --steps trains on from it
    return facts


def _merge_base(model, adapters, model_name, cfg, scheme, dtype, fsdp):
    """A whole, unsharded model carrying the trained adapters, on the CPU, for merging."""
    if not fsdp:
        return unwrap(model).cpu()
    from .loading import load_model
    from .quantizer import quantize_model

    base, _, _ = load_model(model_name, dtype=dtype, with_tokenizer=False, allow_pickle=cfg.allow_pickle)
    if scheme is not None:
        tok = load_model(model_name, allow_pickle=cfg.allow_pickle)[1] if scheme.needs_calibration else None
        quantize_model(base, scheme, None if tok is None else _calibration(tok),
                       progress=False)
    base = add_lora(base, cfg)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for n, t in adapters.items():
            params[n].copy_(t)
    return base


def _gradient_sync(model, procs: Processes, fsdp: bool, last: bool):
    """Gradients are reduced across ranks once per optimizer step, on its last micro-batch."""
    import contextlib

    if not procs.distributed or last:
        if fsdp and procs.distributed:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


def _labelled(batch) -> int:
    """Positions that carry a loss (a label after the first token)."""
    return sum(sum(1 for lab in labels[1:] if lab != IGNORE) for _, labels in batch)


def _batch(examples, cfg: FinetuneConfig, index: int, size: int | None = None):
    """Micro-batch `index` (of `size` sequences, default the batch size) of a seeded shuffle per epoch:
    the same on a resumed run and for any number of processes."""
    n = len(examples)
    size = size or cfg.batch_size
    first = index * size
    out = []
    for j in range(first, first + size):
        epoch, pos = divmod(j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        out.append(examples[order[pos]])
    return out


def _calibration(tok):
    from .quantizer import calibration_tokens

    return calibration_tokens(tok)
