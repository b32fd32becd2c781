"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups of input columns.

    int8   w[n, k] ~ s[n] * q[n, k]                          q in [-127, 127],  s[n] = max_k |w[n, k]| / 127
    int4   w[n, k] ~ s[n, g] * q[n, k] + m[n, g]              q in [0, 15],      per group g of G columns:
                                                              s = (max - min) / 15,  m = min

Both round to the nearest level, so every weight is off by at most half a step: |w - w_hat| <= s / 2 (the tests
check exactly this bound). Activations stay in the model's dtype; only the weights shrink (int8: 1 byte, int4:
half a byte per weight, plus the scales), which is what batch-1 decode is bound by: reading the weights.

Kernels: on CPU, PyTorch's packed weight-only kernels (`torch._weight_int8pack_mm`, and
`aten._weight_int4pack_mm_for_cpu` on weights packed once at load time by `_convert_weight_to_int4pack_for_cpu`,
which stores the zero point as m + 8 s, i.e. w ~ s (q - 8) + z). Their fp32 paths are reference loops (over 10x
slower than the fp32 model itself on an AVX-512 CPU, measured), so an fp32 model's activations enter them in bf16
and leave in fp32 again ("bf16 activations" in the description). That suits decoding (a few rows: reading the
weights is the cost); for a layer fed more than PACKED_MAX_ROWS rows of fp32 activations (a prefill) the weight
is dequantized and the fp32 matmul runs instead, because there the cost is arithmetic, and on CPUs without
bf16 instructions bf16 arithmetic is emulated and slower than fp32. Elsewhere (CUDA, MPS) a plain fallback
dequantizes the weight and calls F.linear: correct everywhere, but without the speed. `kernel_for` says which.

Why here (project/) and not in llama/: quantization is an efficiency technique applied to a loaded model, like
LoRA; the model code is unchanged and any checkpoint format can be quantized at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import UserError
from llama.runtime import DTYPE_NAMES

MODES = ("none", "int8", "int4")
PACKED_MAX_ROWS = 32  # fp32 activations: above this many rows (a prefill), dequantize and use the fp32 matmul
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "none"  # none, int8 or int4
    group_size: int = 32  # int4 only: input columns sharing one scale and minimum
    output: bool = True  # also the output projection (the largest matrix of a small model)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"--quantize must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size}")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.mode == "int4" else self.mode


def kernel_for(device: torch.device, mode: str) -> str:
    """'packed' where PyTorch has a weight-only kernel for mode on this device, else 'dequantize'."""
    if device.type == "cpu":
        has = {
            "int8": hasattr(torch, "_weight_int8pack_mm"),
            "int4": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
        }
        if has[mode]:
            return "packed"
    return "dequantize"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8, s (N,) fp32 with w ~ s[:, None] * q."""
    w = w.float()
    s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) uint8 in [0, 15], s (N, K/G) and m (N, K/G) fp32 with w ~ s * q + m per group."""
    N, K = w.shape
    if K % group_size:
        raise UserError(f"int4: input width {K} is not a multiple of --group_size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), s, lo


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activations' dtype inside the packed kernels: bf16 for an fp32 model (see the module docstring)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


class QuantizedMatmul(torch.autograd.Function):
    """x -> layer(x) for a quantized layer, differentiable in x (the weights are frozen): dx = dy W_hat.

    Autograd through `F.linear(x, layer.dequantize())` would keep every layer's dequantized weight alive
    until backward, i.e. a full-precision copy of the model; here backward dequantizes the layer again.
    This is what trains LoRA adapters on a quantized base (QLoRA-style, project/frozen_base.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ dequantized(ctx.layer, grad_y.dtype, grad_y.device), None


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer for a dequantized weight, one per (device, dtype), as large as the largest layer.

    Every layer dequantizes into the same memory, used at once and then free again: allocating a fresh
    (N, K) tensor per layer and call made the kernel fault its pages in every time (a 1B layer's int8
    dequantization took 69 ms fresh, 13 ms into reused memory, measured), and under the training allocator
    settings (project/allocator.py) the fresh copies spread over freed memory and kept it resident.
    """
    n = math.prod(shape)
    key = (torch.device(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # made during generation it would be read-only to training afterwards
            _SCRATCH[key] = buf = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def dequantized(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """layer's weight (out, in) in dtype, dequantized into the scratch buffer: use it before the next layer does."""
    return layer.dequantize(dtype, out=scratch((layer.out_features, layer.in_features), dtype, device))


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every nn.Linear inside the transformer blocks, LoRA's base layers included."""
    return [(block, name) for block in model.layers.modules() for name, child in block.named_children()
            if isinstance(child, nn.Linear)]  # fmt: skip


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 and one scale per output channel."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.kernel = w.shape[1], w.shape[0], kernel
        q, s = quantize_int8(w)
        self.register_buffer("q", q.to(w.device))
        dtype = kernel_dtype(w.dtype) if kernel == "packed" else w.dtype
        self.register_buffer("scales", s.to(device=w.device, dtype=dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) in dtype: q times its row's scale; into `out` (N, K) if given."""
        if out is None:
            return self.q * self.scales[:, None].to(dtype)  # one kernel: int8 * float promotes to float
        return out.copy_(self.q).mul_(self.scales[:, None].to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "dequantize" or (x.dtype == torch.float32 and x2.shape[0] > PACKED_MAX_ROWS):
            return F.linear(x, dequantized(self, x.dtype, x.device))
        y = torch._weight_int8pack_mm(x2.to(self.scales.dtype), self.q, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The levels (N, K) uint8 from `_convert_weight_to_int4pack_for_cpu`'s (N, K/2) bytes: blocks of 64 rows,
    each stored column by column, byte j of a column holding rows j (low nibble) and j + 32 (high nibble).
    That layout is PyTorch's internal one: Int4Linear checks it on every layer it packs."""
    b = packed.reshape(n // 64, k, 32)
    return torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as 4-bit levels and a scale and minimum per group of input columns."""

    def __init__(self, linear: nn.Linear, group_size: int, kernel: str):
        super().__init__()
        w = linear.weight.detach()
        N, K = w.shape
        self.in_features, self.out_features, self.group_size = K, N, group_size
        q, s, m = quantize_int4(w, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1) if kernel == "packed" else None
        # The packed bytes must also serve prefill's dequantized path: keep them only where the layout is known.
        if packed is not None and N % 64 == 0 and torch.equal(unpack_int4(packed, N, K), q):
            self.kernel = "packed"
            self.register_buffer("q", packed)
            # The kernel's (K/G, N, 2) [scale, zero] with w ~ scale * (q - 8) + zero.
            scales_zeros = torch.stack([s.T, (m + 8 * s).T], dim=-1).to(kernel_dtype(w.dtype)).contiguous()
            self.register_buffer("scales_zeros", scales_zeros)
        else:
            self.kernel = "dequantize"
            self.register_buffer("q", q.to(w.device))
            scales_zeros = torch.stack([s.T, (m + 8 * s).T], dim=-1).to(device=w.device, dtype=w.dtype)
            self.register_buffer("scales_zeros", scales_zeros)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) in dtype: scale * (q - 8) + zero = q * scale + (zero - 8 scale) group by group, in place on the
        one full-size result (the per-group terms are small), from either layout; into `out` (N, K) if given."""
        N, K, G = self.out_features, self.in_features, self.group_size
        w = torch.empty(N, K, dtype=dtype, device=self.q.device) if out is None else out
        if self.kernel == "packed":  # unpack_int4's layout, each nibble converted straight into its place in w
            b = self.q.reshape(N // 64, K, 32).transpose(1, 2)  # (blocks, byte j, column)
            halves = w.view(N // 64, 2, 32, K)  # (blocks, low / high nibble, row j within the half, column)
            halves[:, 0].copy_(b & 15)
            halves[:, 1].copy_(b >> 4)
        else:
            w.copy_(self.q)
        sz = self.scales_zeros.to(dtype).transpose(0, 1)  # (N, K/G, 2)
        scale, offset = sz[..., :1], sz[..., 1:] - 8 * sz[..., :1]
        return w.view(N, K // G, G).mul_(scale).add_(offset).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "dequantize" or (x.dtype == torch.float32 and x2.shape[0] > PACKED_MAX_ROWS):
            return F.linear(x, dequantized(self, x.dtype, x.device))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(self.scales_zeros.dtype), self.q, self.group_size, self.scales_zeros
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize(model: nn.Module, cfg: QuantConfig) -> str:
    """Replace every nn.Linear of the transformer blocks (and the output projection if cfg.output) in place.

    Tied embeddings keep their full-precision table for the lookup; the output projection gets its own
    quantized copy. Returns a one-line description (what, which kernel) for the log and the reports."""
    if cfg.mode == "none":
        return "weights not quantized"
    weight = next(model.parameters())
    kernel = kernel_for(weight.device, cfg.mode)
    targets = block_linears(model)
    if cfg.output and isinstance(model.output, nn.Linear):
        targets.append((model, "output"))
    for parent, name in targets:
        linear = getattr(parent, name)
        new = Int8Linear(linear, kernel) if cfg.mode == "int8" else Int4Linear(linear, cfg.group_size, kernel)
        setattr(parent, name, new)
    where = "block linears" + (" and output" if cfg.output else "")
    acts = f", {DTYPE_NAMES[kernel_dtype(weight.dtype)]} activations" if kernel == "packed" else ""
    return f"{cfg.name} weights ({len(targets)} {where}), {kernel} kernel on {weight.device.type}{acts}"
