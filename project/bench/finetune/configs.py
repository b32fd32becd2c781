"""The configurations the benchmark runs: 2 x 2 x 2 techniques, gradient accumulation at both ends, and LoRA on a
quantized frozen base (QLoRA-style)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llama.errors import UserError
from project.cli import name_list


@dataclass(frozen=True)
class BenchConfig:
    grad_ckpt: bool  # every block checkpointed (policy "all") or none
    amp: bool  # mixed precision: autocast in the device's 16-bit dtype (bf16, or fp16 + GradScaler)
    lora: bool  # LoRA on wq, wv (everything else frozen) or full fine-tuning
    grad_accum: int = 1  # micro-batches per optimizer step
    base: str = "auto"  # the frozen base of a LoRA run (project/frozen_base.py): auto, or bf16 / int8 / int4

    @property
    def name(self) -> str:
        parts = [p for p, on in (("ckpt", self.grad_ckpt), ("amp", self.amp), ("lora", self.lora)) if on]
        if self.base != "auto":
            parts.append(self.base)
        if self.grad_accum > 1:
            parts.append(f"accum{self.grad_accum}")
        return "+".join(parts) or "vanilla"


VANILLA = BenchConfig(False, False, False)
ALL_ON = BenchConfig(True, True, True)  # the three techniques that change one micro-batch


QUANTIZED_BASES = [  # LoRA on a bf16-stored / int8 / int4 frozen base, fp32 arithmetic; the leanest combination
    BenchConfig(False, False, True, base="bf16"),
    BenchConfig(False, False, True, base="int8"),
    BenchConfig(False, False, True, base="int4"),
    BenchConfig(True, True, True, base="int4"),
]


def default_sweep(grad_accum: int = 8) -> list[BenchConfig]:
    """All 8 combinations without accumulation, accumulation for the vanilla and the all-on ones, quantized bases."""
    combos = [BenchConfig(c, m, l) for c, m, l in itertools.product((False, True), repeat=3)]
    combos.sort(key=lambda c: (c.grad_ckpt + c.amp + c.lora, not c.grad_ckpt, not c.amp))
    accum = [BenchConfig(False, False, False, grad_accum), BenchConfig(True, True, True, grad_accum)]
    return combos + accum + QUANTIZED_BASES


def select(names: str | list | tuple | None, grad_accum: int = 8) -> list[BenchConfig]:
    """The configurations named (e.g. "vanilla,lora,ckpt+amp+lora+accum8"), in sweep order; None = all."""
    sweep = default_sweep(grad_accum)
    if names is None:
        return sweep
    wanted = name_list(names)
    by_name = {c.name: c for c in sweep}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise UserError(f"unknown configuration {', '.join(unknown)}: choose from {', '.join(by_name)}")
    return [c for c in sweep if c.name in wanted]
