"""What a fine-tuning run holds its weights in: fp32 master weights, or a LoRA run's frozen base in 16 or 4-8 bits.

With LoRA the base weights get no gradient and no optimizer state, so they need no fp32 master copy:

    --base   base weights held as                 their matmuls                          chosen by auto when
    fp32     fp32                                 fp32, or cast by autocast every forward full fine-tuning; LoRA
                                                                                          without mixed precision
    bf16     bf16 (fp16: the P100 and MPS case)   in that dtype directly: no cast, no copy LoRA + mixed precision
             with --precision fp32: the block     fp32: each layer converted back one at  never (ask for it where
             linears stored in bf16 / fp16        a time, forward and input gradient      16-bit matmuls are slow)
    int8     int8, one scale per output row       dequantized a layer at a time (QLoRA-   never (a technique
    int4     4 bits, scale and minimum per 32     style; project/quant.py), forward and   to ask for)
             input columns                        the input gradient alike

In every case the LoRA adapters, their gradients and the optimizer state are fp32 and the loss is computed in
fp32. Full fine-tuning always keeps fp32 master weights (autocast casts them for the matmuls). A quantized or
16-bit-stored base (fp32 compute) converts the transformer blocks' linear layers; the embeddings, norms and output
projection stay fp32 (QLoRA also keeps the output layer in 16 bits) so that the residual stream stays fp32.
Storage in 16 bits with fp32 arithmetic is QLoRA's storage-dtype / compute-dtype split; it is what a CPU without
bf16 instructions (where bf16 matmuls are emulated, several times slower than fp32) runs fast with half the
base's memory.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llama.errors import UserError
from llama.matmul import linear
from llama.runtime import DTYPES
from project.allocator import release_free_memory
from project.model.lora import LoRAConfig, apply_lora
from project.quant import QuantConfig, QuantizedMatmul, block_linears, dequantized, quantize

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
    if base in ("bf16", "fp16") and precision not in (base, "fp32"):
        raise UserError(f"--base {base} goes with --precision {base} (computed in it) or fp32 (stored in it only)")
    return base


def stored_only(base: str, precision: str) -> bool:
    """A 16-bit base under fp32 arithmetic: the block linears stored in 16 bits, converted back to compute."""
    return base in ("bf16", "fp16") and precision == "fp32"


def load_dtype(base: str, precision: str) -> torch.dtype:
    """The dtype to load the weights in: a 16-bit base's own when it computes in it; otherwise fp32 (converted,
    or quantized, after loading)."""
    return DTYPES[base] if base in ("bf16", "fp16") and base == precision else torch.float32


def prepare(model: nn.Module, lora: Optional[LoRAConfig], base: str, precision: str) -> str:
    """Make model trainable in place: LoRA adapters (fp32) on the base as resolve_base chose it, or every
    weight (full fine-tuning). Returns a one-line description of what is held in which dtype."""
    if lora:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    what = base
    if base in QUANTIZED:
        what = "quantized (" + quantize(model, QuantConfig(base, output="none"), training=True) + ")"
    elif stored_only(base, precision):
        n = store_linears(model, DTYPES[base])
        what = f"{base} storage for the {n} block linears (fp32 arithmetic; embeddings, norms and output fp32)"
    release_free_memory()  # the fp32 weights a 16-bit-stored base replaced, a load's temporaries (quantize() trims too)
    if not lora:
        return "every weight trained, fp32 master weights"
    return f"frozen base {what}; LoRA adapters, their gradients and optimizer state fp32"


class StoredLinear(nn.Module):
    """y = x W^T with W stored in a 16-bit dtype and converted to the activations' dtype for each use, one layer
    at a time, into project/quant.py's scratch buffer (and through its QuantizedMatmul when x needs a gradient)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.register_buffer("weight", linear.weight.detach().to(dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.weight.to(dtype) if out is None else out.copy_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        if x.dtype == self.weight.dtype:
            return linear(x, self.weight)
        return linear(x, dequantized(self, x.dtype, x.device))


def store_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear of the transformer blocks (LoRA's base layers included) by a StoredLinear."""
    targets = block_linears(model)
    for parent, name in targets:
        setattr(parent, name, StoredLinear(getattr(parent, name), dtype))
    return len(targets)
