"""What a fine-tuning run holds its weights in: fp32 master weights, or a LoRA run's frozen base in 16 or 4-8 bits.

With LoRA the base weights get no gradient and no optimizer state, so they need no fp32 master copy:

    --base   base weights held as                 their matmuls                          chosen by auto when
    fp32     fp32                                 fp32, or cast by autocast every forward full fine-tuning; LoRA
                                                                                          without mixed precision
    bf16     bf16 (fp16: the P100 and MPS case)   in that dtype directly: no cast, no copy LoRA + mixed precision
    int8     int8, one scale per output row       dequantized a layer at a time (QLoRA-   never (a technique
    int4     4 bits, scale and minimum per 32     style; project/quant.py), forward and   to ask for)
             input columns                        the input gradient alike

In every case the LoRA adapters, their gradients and the optimizer state are fp32 and the loss is computed in
fp32. Full fine-tuning always keeps fp32 master weights (autocast casts them for the matmuls). A quantized base
quantizes the transformer blocks' linear layers; the embeddings, norms and output projection stay fp32 (QLoRA
also keeps the output layer in 16 bits).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llama.errors import UserError
from llama.runtime import DTYPES
from project.allocator import release_free_memory
from project.model.lora import LoRAConfig, apply_lora
from project.quant import QuantConfig, quantize

BASES = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")


def resolve_base(base: str, precision: str, lora: bool) -> str:
    """The base a run holds (fp32, bf16, fp16, int8, int4) for --base, --precision and whether LoRA is on."""
    base = str(base).lower()
    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, not {base!r}")
    if base == "auto":
        return precision if lora else "fp32"
    if not lora and base != "fp32":
        raise UserError(
            f"--base {base} needs LoRA: full fine-tuning trains every weight and keeps fp32 master weights "
            "(use --base auto or fp32, or --lora True)"
        )
    if base in ("bf16", "fp16") and base != precision:
        raise UserError(
            f"--base {base} holds the base in the autocast dtype: use it with --precision {base}, or --base auto"
        )
    return base


def load_dtype(base: str) -> torch.dtype:
    """The dtype to load the weights in: the base's own for 16-bit bases; quantization starts from fp32."""
    return DTYPES[base] if base in ("bf16", "fp16") else torch.float32


def prepare(model: nn.Module, lora: Optional[LoRAConfig], base: str) -> str:
    """Make model trainable in place: LoRA adapters (fp32) on the base as resolve_base chose it, or every
    weight (full fine-tuning). Returns a one-line description of what is held in which dtype."""
    if lora:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    what = "quantized (" + quantize(model, QuantConfig(base, output=False)) + ")" if base in QUANTIZED else base
    release_free_memory()  # the fp32 weights a quantized base replaced; a 16-bit load's temporaries
    if not lora:
        return "every weight trained, fp32 master weights"
    return f"frozen base {what}; LoRA adapters, their gradients and optimizer state fp32"
