"""The configurations the benchmark runs: 2 x 2 x 2 techniques, plus gradient accumulation at both ends."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llama.errors import UserError
from project.cli import name_list


@dataclass(frozen=True)
class BenchConfig:
    grad_ckpt: bool  # every block checkpointed (policy "all") or none
    amp: (
        bool  # mixed precision: autocast in the device's 16-bit dtype (bf16, or fp16 + GradScaler); fp32 master weights
    )
    lora: bool  # LoRA on wq, wv (everything else frozen) or full fine-tuning
    grad_accum: int = 1  # micro-batches per optimizer step

    @property
    def name(self) -> str:
        parts = [p for p, on in (("ckpt", self.grad_ckpt), ("amp", self.amp), ("lora", self.lora)) if on]
        if self.grad_accum > 1:
            parts.append(f"accum{self.grad_accum}")
        return "+".join(parts) or "vanilla"


VANILLA = BenchConfig(False, False, False)
ALL_ON = BenchConfig(True, True, True)  # the three techniques that change one micro-batch


def default_sweep(grad_accum: int = 8) -> list[BenchConfig]:
    """All 8 combinations without accumulation, then accumulation for the vanilla and the all-on ones."""
    combos = [BenchConfig(c, m, l) for c, m, l in itertools.product((False, True), repeat=3)]
    combos.sort(key=lambda c: (c.grad_ckpt + c.amp + c.lora, not c.grad_ckpt, not c.amp))
    return combos + [BenchConfig(False, False, False, grad_accum), BenchConfig(True, True, True, grad_accum)]


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
