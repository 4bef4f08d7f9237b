"""Fine-tuning's settings, apart from finetune.py so that the CLI's --help and recipe checks read
them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    allow_pickle: bool = False  # read *.bin pickle checkpoints (model and teacher); unsafe, opt-in
    extra: dict = field(default_factory=dict)
