"""Quantization of the linear layers: weight-only int8 per output channel and int4 in groups of input columns,
and w8a8 (int8 weights and activations, integer matmul).

    int8   w[n, k] ~ s[n] * q[n, k]                          q in [-127, 127],  s[n] = max_k |w[n, k]| / 127
    int4   w[n, k] ~ s[n, g] * q[n, k] + m[n, g]              q in [0, 15],      per group g of G columns:
                                                              s = (max - min) / 15,  m = min
    w8a8   the int8 weights, and each row (token) of the activations x[t, k] ~ r[t] / 127 * a[t, k] at run time
           (dynamic), a in [-127, 127], r[t] = max_k |x[t, k]|:  y[t, n] = r[t] / 127 * s[n] * sum_k a q  (int32 sums);
           on x86 CPUs without VNNI the weights take 63 levels a side, s[n] = max_k |w[n, k]| / 63 (see "fbgemm")

The output projection takes a format of its own (QuantConfig.output_mode): by default int8 under int4 blocks, as
llama.cpp's Q4 files keep it at 8 bits, since 4 bits cost it far more quality than they cost the blocks.

All round to the nearest level, so every weight (and w8a8 activation) is off by at most half a step: |w - w_hat| <=
s / 2 (the tests check exactly this bound). int8 and int4 keep the activations in the model's dtype; only the
weights shrink (int8: 1 byte, int4: half a byte per weight, plus the scales), which is what batch-1 decode is bound
by: reading the weights. w8a8 also makes the arithmetic integer, which is what prefill and batched decode are bound
by on a CPU (int8 dot products: 4x fp32's per instruction with VNNI); it costs more quality than weight-only int8
(a token's largest activation sets its step), measured by the benchmark's quality table. Each token has its own
scale, so a row's result does not depend on the other rows of the call (KV cache on/off and batching agree).

Kernels (`kernel_for` chooses; `quantize` says which in its description):
- "packed", on CPU: PyTorch's packed weight-only kernels (`torch._weight_int8pack_mm`, and
  `aten._weight_int4pack_mm_for_cpu` on weights packed once at load time by `_convert_weight_to_int4pack_for_cpu`,
  which stores the zero point as m + 8 s, i.e. w ~ s (q - 8) + z). Their fp32 paths are reference loops (over 10x
  slower than the fp32 model itself on an AVX-512 CPU, measured), so an fp32 model's activations enter them in bf16
  and leave in fp32 again ("bf16 activations" in the description). That suits decoding (a few rows: reading the
  weights is the cost); for a layer fed more rows than PACKED_MAX_ROWS gives its format (a prefill: 32 with int8, 64
  with int4) the weight is dequantized into the activations' dtype (int8 with fewer rows than columns: only
  converted, its scales applied to the products) and the plain matmul runs instead, because there the cost is
  arithmetic: always for fp32, and for bf16 where the CPU multiplies bf16 natively (AVX-512 BF16 / AMX; a 1B-shape
  bf16 prefill of 256 tokens on an AMD EPYC with AVX-512 BF16: 4.6 s with int8 through the packed kernel, 1.4 s
  unquantized).
  Without native bf16 a bf16 model's prefill stays on the packed kernels, since there bf16 matmuls are emulated.
- "tinygemm", int4 on CUDA GPUs of compute capability 8.0 or later: `aten._weight_int4pack_mm`, the tensor-core
  kernel gpt-fast uses (bf16 activations, the same [scale, zero] pairs), on weights packed once by
  `_convert_weight_to_int4pack`. Its tiled layout is opaque, so training (backward needs the dequantized weight
  every step) keeps the plain layout below instead.
- "fbgemm", w8a8 on x86 CPUs: PyTorch's quantized linear (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`,
  FBGEMM, on weights packed once by `quantized::linear_prepack`), fed each row divided by its own max |x| with the
  fixed activation scale 1/127: that is exactly the per-token quantization above, done inside the kernel. Without
  VNNI it multiplies with AVX2's vpmaddubsw, which adds two products of an unsigned activation byte (up to 255) and a
  weight into 16 bits and saturates above 32767; weights of at most 63 keep every pair below (2 * 255 * 63 = 32130).
  So there the weights take 7 bits (stated on load). On the default model 7-bit weights cost +6.8 % perplexity over
  fp32, 7-bit activations (the other way out) +19 % (measured by forcing each on a VNNI CPU).
- "dequantize" everywhere else (int8 on CUDA, int4 before sm80, MPS, training on CUDA): the weight is dequantized
  into a reused buffer and F.linear runs: correct everywhere, with the memory saving, without the speed. int4
  levels are stored two to a byte here too.
Why here (project/) and not in llama/: quantization is an efficiency technique applied to a loaded model, like
LoRA; the model code is unchanged and any checkpoint format can be quantized at load time.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import UserError
from llama.matmul import linear
from llama.model import ColumnBlocks, Linear, row_product
from llama.runtime import DTYPE_NAMES, has_native_matmul
from project.allocator import release_free_memory

MODES = ("none", "int8", "int4", "w8a8")
OUTPUT_MODES = ("auto", *MODES)
# Above this many rows (a prefill) a packed CPU kernel gives way to dequantizing and the matmul of the activations'
# dtype: the packed kernels' time grows with every row, while dequantizing costs once. On the 1B shape's 16384 x 2048
# layer (bf16, AMD EPYC with AVX-512 BF16, 2 threads) int4 took 0.92 ms for 1 row and ~0.42 more a row (26.4 ms at
# 64 rows against 31.4 dequantized, 39.9 against 38.0 at 96), and every SmolLM2 and 1B layer shape crossed over
# between 80 and 100 rows (packed 0.69-0.87x the time at 64); int8's kernel took 1.77 ms and ~0.68 more a row and
# crosses earlier (at 32 rows 22.8 ms packed against 13.9 on that layer, a tie on SmolLM2's shapes).
PACKED_MAX_ROWS = {"int8": 32, "int4": 64}
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "none"  # none, int8, int4 or w8a8: the linear layers of the blocks
    group_size: int = 32  # int4 only: input columns sharing one scale and minimum
    output: str = "auto"  # the output projection, if mode quantizes the blocks: auto (output_mode) or a mode

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"--quantize must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size}")
        if self.output not in OUTPUT_MODES:
            raise UserError(f"--quantize_output must be one of {', '.join(OUTPUT_MODES)}, not {self.output!r}")

    @property
    def output_mode(self) -> str:
        """The output projection's format (none if the blocks are not quantized). auto: int8 under int4 blocks,
        else the blocks' own. It is the matrix 4 bits hurt most: on the default model (whose blocks were stored as
        Q4_1, its embedding as Q8_0) int4 blocks with an int8 output projection change perplexity by -0.004 %, with
        an int4 one by +5.6 % (measured); llama.cpp's 4-bit files keep it at 6 or 8 bits for the same reason."""
        if self.mode == "none" or self.output != "auto":
            return "none" if self.mode == "none" else self.output
        return "int8" if self.mode == "int4" else self.mode

    @property
    def name(self) -> str:
        """int8, int4-g32, w8a8; with ", output MODE" where the output projection is not in its auto format."""
        blocks = f"int4-g{self.group_size}" if self.mode == "int4" else self.mode
        auto = QuantConfig(self.mode, self.group_size).output_mode
        return blocks if self.output_mode == auto else f"{blocks}, output {self.output_mode}"


def kernel_for(device: torch.device, mode: str, training: bool = False) -> str:
    """'packed' (CPU), 'tinygemm' (int4, CUDA sm80+) or 'fbgemm' (w8a8, x86 CPU) where PyTorch has a kernel for mode
    on this device, else 'dequantize'. training: the layers will be trained through (LoRA on a quantized base)."""
    if mode == "w8a8":
        return (
            "fbgemm"
            if device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            else "dequantize"
        )
    if device.type == "cpu":
        has = {
            "int8": hasattr(torch, "_weight_int8pack_mm"),
            "int4": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
        }
        if has[mode]:
            return "packed"
    if device.type == "cuda" and mode == "int4" and not training and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "tinygemm"
    return "dequantize"


def quantize_int8(w: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 in [-levels, levels], s (N,) fp32 with w ~ s[:, None] * q."""
    w = w.float()
    s = w.abs().amax(dim=1).clamp(min=1e-12) / levels
    q = torch.round(w / s[:, None]).clamp(-levels, levels).to(torch.int8)
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


def kernel_dtype(dtype: torch.dtype, kernel: str) -> torch.dtype:
    """The activations' (and scales') dtype inside a kernel for a model in dtype: tinygemm takes only bf16; the CPU
    kernels bf16 for an fp32 model (see the module docstring), else the model's own; the fallback the model's."""
    if kernel == "tinygemm" or (kernel == "packed" and dtype == torch.float32):
        return torch.bfloat16
    return dtype


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
        return linear(grad_y, dequantized(ctx.layer, grad_y.dtype, grad_y.device).t()), None


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


def dequantize_rows(x: torch.Tensor, mode: str) -> bool:
    """x (M, K) for mode's packed CPU kernel: True where dequantizing the weight and running the matmul of x's dtype
    is faster (more than PACKED_MAX_ROWS[mode] rows, and a dtype the CPU multiplies natively)."""
    return x.shape[0] > PACKED_MAX_ROWS[mode] and native_matmul(x.device, x.dtype)


native_matmul = functools.lru_cache(has_native_matmul)  # asked once per device and dtype, not once per layer call


def dequantized(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """layer's weight (out, in) in dtype, dequantized into the scratch buffer: use it before the next layer does."""
    return layer.dequantize(dtype, out=scratch((layer.out_features, layer.in_features), dtype, device))


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None):
    """(N, K) in dtype: int8 levels q (N, K) times their row's scale (N,); into `out` (N, K) if given."""
    if out is None:
        return q * scales[:, None].to(dtype)  # one kernel: int8 * float promotes to float
    return out.copy_(q).mul_(scales[:, None].to(dtype))


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every nn.Linear inside the transformer blocks, LoRA's base layers included."""
    return [(block, name) for block in model.layers.modules() for name, child in block.named_children()
            if isinstance(child, nn.Linear)]  # fmt: skip


def join_column_blocks(model: nn.Module):
    """Replace each unquantized ColumnBlocks inside the transformer blocks by the one Linear it holds, in place."""
    for block in model.layers.modules():
        for name, child in block.named_children():
            if isinstance(child, ColumnBlocks) and all(type(part) is Linear for part in child.parts):
                setattr(block, name, child.joined())


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 and one scale per output channel."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.kernel = w.shape[1], w.shape[0], kernel
        q, s = quantize_int8(w)
        self.register_buffer("q", q.to(w.device))
        self.register_buffer("scales", s.to(device=w.device, dtype=kernel_dtype(w.dtype, kernel)))

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) in dtype: q times its row's scale; into `out` (N, K) if given."""
        return dequantize_int8(self.q, self.scales, dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "packed" and torch.compiler.is_compiling() and x2.shape[0] == 1:
            # As llama.model.Linear's single row, over the int8 levels (the default model's compiled batch-1 step
            # ~16 -> ~11 ms against the packed kernel; README).
            return (row_product(x, self.q) * self.scales.float()).to(x.dtype)
        if self.kernel == "dequantize" or dequantize_rows(x2, "int8"):
            if x2.shape[0] >= self.in_features or x.dtype == torch.float16:
                return linear(x, dequantized(self, x.dtype, x.device))
            # Fewer rows than columns (a prefill of a short prompt): the scale of each output channel is applied to
            # the M x N products instead of the N x K weights, which are only converted (exactly: |q| <= 127).
            # Not in fp16, whose range the unscaled products (~127 / max |w| times the outputs) could overflow.
            levels = scratch((self.out_features, self.in_features), x.dtype, x.device).copy_(self.q)
            return linear(x, levels).mul_(self.scales.to(x.dtype))
        y = torch._weight_int8pack_mm(x2.to(self.scales.dtype), self.q, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The levels (N, K) uint8 from `_convert_weight_to_int4pack_for_cpu`'s (N, K/2) bytes: blocks of 64 rows,
    each stored column by column, byte j of a column holding rows j (low nibble) and j + 32 (high nibble).
    That layout is PyTorch's internal one: Int4Linear checks it on every layer it packs."""
    b = packed.reshape(n // 64, k, 32)
    return torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """Levels (N, K) in [0, 15] -> (N, K/2) uint8, two to a byte: column 2j in the high nibble, 2j + 1 in the low
    one. The plain layout, and the one `_convert_weight_to_int4pack` (CUDA) takes."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def tinygemm_tiles(k: int) -> Optional[int]:
    """The widest inner k-tiling (8, 4 or 2 tiles of 16 columns) that divides the input width k, or None."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as 4-bit levels and a scale and minimum per group of input columns."""

    def __init__(self, linear: nn.Linear, group_size: int, kernel: str):
        super().__init__()
        w = linear.weight.detach()
        N, K = w.shape
        self.in_features, self.out_features, self.group_size = K, N, group_size
        q, s, m = quantize_int4(w, group_size)
        # One [scale, zero] pair per group and output, (K/G, N, 2), with w ~ scale * (q - 8) + zero: the kernels' form.
        scales_zeros = torch.stack([s.T, (m + 8 * s).T], dim=-1)
        self.kernel = "dequantize"
        if kernel == "packed" and N % 64 == 0:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
            # The packed bytes also serve prefill's dequantized path: keep them only where the layout is known.
            if torch.equal(unpack_int4(packed, N, K), q):
                self.kernel, q = "packed", packed
        elif kernel == "tinygemm" and N % 8 == 0 and tinygemm_tiles(K):
            self.kernel = "tinygemm"
            q = torch.ops.aten._convert_weight_to_int4pack(pack_pairs(q), tinygemm_tiles(K))
        if self.kernel == "dequantize":
            q = pack_pairs(q)
        self.register_buffer("q", q)
        self.register_buffer("scales_zeros", scales_zeros.to(kernel_dtype(w.dtype, self.kernel)).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) in dtype: scale * (q - 8) + zero = q * scale + (zero - 8 scale) group by group, in place on the
        one full-size result (the per-group terms are small); into `out` (N, K) if given."""
        N, K, G = self.out_features, self.in_features, self.group_size
        w = torch.empty(N, K, dtype=dtype, device=self.q.device) if out is None else out
        if self.kernel == "tinygemm":  # no unpacking of the tiled layout: the kernel itself, on the identity
            eye = torch.eye(K, dtype=torch.bfloat16, device=self.q.device)
            return w.copy_(torch.ops.aten._weight_int4pack_mm(eye, self.q, G, self.scales_zeros).T)
        if self.kernel == "packed":  # unpack_int4's layout
            # The bytes are transposed first, at half a byte per weight, so that every pass over w is contiguous
            # (converting each nibble straight from the transposed view took 1.7x as long in bf16, measured).
            b = self.q.reshape(N // 64, K, 32).transpose(1, 2)  # (blocks, byte j, column)
            b = scratch(b.shape, torch.uint8, b.device).copy_(b)
            halves = w.view(N // 64, 2, 32, K)  # (blocks, low / high nibble, row j within the half, column)
            halves[:, 1].copy_(b >> 4)
            halves[:, 0].copy_(b.bitwise_and_(15))
        else:  # pack_pairs' layout
            pairs = w.view(N, K // 2, 2)
            pairs[..., 0].copy_(self.q >> 4)
            pairs[..., 1].copy_(self.q & 15)
        sz = self.scales_zeros.transpose(0, 1).to(dtype)  # (N, K/G, 2)
        scale, offset = sz[..., :1], torch.add(sz[..., 1:], sz[..., :1], alpha=-8)  # zero - 8 scale
        return w.view(N, K // G, G).mul_(scale).add_(offset).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(
                x2.to(torch.bfloat16).contiguous(), self.q, self.group_size, self.scales_zeros
            )
        elif self.kernel == "dequantize" or dequantize_rows(x2, "int4"):
            return linear(x, dequantized(self, x.dtype, x.device))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(  # which takes contiguous rows only
                x2.to(self.scales_zeros.dtype).contiguous(), self.q, self.group_size, self.scales_zeros
            )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


# w8a8's weight levels a side on "fbgemm": 63 where the CPU has no VNNI (see the module docstring)
FBGEMM_WEIGHT_LEVELS = 127 if getattr(torch.cpu, "_is_vnni_supported", lambda: False)() else 63


def row_max(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, 1): max |x| of each row (never 0), the scale of its w8a8 levels."""
    r = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())  # |x|'s max, without |x|
    return r.clamp_(min=torch.finfo(torch.float32).tiny)


# The "fbgemm" layers, by key: the kernel's packed weight is a TorchScript object, which torch.compile cannot take as
# an input, so the compiled decode step calls the kernel through this operator with the layer's key instead.
_W8A8_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_OPS = torch.library.Library("efficient_llama", "DEF")
_OPS.define("w8a8_linear(Tensor x, int layer) -> Tensor")


def _w8a8_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    """x (M, K) fp32, each row already divided by its max |x|: the int32 sums times the weight scales, over 127."""
    packed = _W8A8_LAYERS[layer].packed
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1 / 127, 128, packed)


_OPS.impl("w8a8_linear", _w8a8_linear, "CPU")


@torch.library.register_fake("efficient_llama::w8a8_linear")
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _W8A8_LAYERS[layer].out_features)


class W8A8Linear(nn.Module):
    """y = x W^T in integer arithmetic: W int8 per output channel, each row of x quantized to 8 bits as it comes."""

    def __init__(self, linear: nn.Linear, kernel: str, weight_levels: Optional[int] = None):
        """weight_levels: a side, by default FBGEMM_WEIGHT_LEVELS on "fbgemm", else 127."""
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.kernel = w.shape[1], w.shape[0], kernel
        self.weight_levels = weight_levels or (FBGEMM_WEIGHT_LEVELS if kernel == "fbgemm" else 127)
        q, s = quantize_int8(w, self.weight_levels)
        self.register_buffer("scales", s.to(w.device))
        if kernel == "fbgemm":
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the kernel takes one
                warnings.simplefilter("ignore")
                zero = torch.zeros_like(s, dtype=torch.long)
                self.packed = torch.ops.quantized.linear_prepack(
                    torch._make_per_channel_quantized_tensor(q, s.double(), zero, 0), None
                )
            self.packed_bytes = q.numel() + 12 * self.out_features  # the kernel's copy: levels, scales, row sums
            self._register()
        else:
            self.register_buffer("q", q)

    def _register(self):
        self.key = id(self)
        _W8A8_LAYERS[self.key] = self

    def __setstate__(self, state):  # a copy (copy.deepcopy, pickle) is a layer of its own
        super().__setstate__(state)
        if self.kernel == "fbgemm":
            self._register()

    def levels(self) -> torch.Tensor:
        """The int8 weight levels (N, K)."""
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()
        return self.q

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) in dtype: the weight levels times their row's scale; into `out` (N, K) if given."""
        return dequantize_int8(self.levels(), self.scales, dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features).float()
        r = row_max(x2)
        if self.kernel == "fbgemm":
            y = torch.ops.efficient_llama.w8a8_linear(x2 / r, self.key).mul_(r)
        else:  # the same levels, multiplied in floating point by the weight dequantized into the shared buffer
            y = F.linear(torch.round(x2 * (127 / r)), dequantized(self, x2.dtype, x2.device)).mul_(r / 127)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


LAYERS = {
    "int8": lambda linear, cfg, kernel: Int8Linear(linear, kernel),
    "int4": lambda linear, cfg, kernel: Int4Linear(linear, cfg.group_size, kernel),
    "w8a8": lambda linear, cfg, kernel: W8A8Linear(linear, kernel),
}


def quantize(model: nn.Module, cfg: QuantConfig, training: bool = False) -> str:
    """Replace every nn.Linear of the transformer blocks (cfg.mode) and the output projection (cfg.output_mode)
    in place. training: the quantized layers will be trained through (kernel_for).

    Tied embeddings keep their full-precision table for the lookup; the output projection gets its own
    quantized copy. Returns a one-line description (what, which kernel) for the log and the reports.

    A long-rowed weight that inference holds in column blocks (llama.model.ColumnBlocks) is quantized block by
    block under int8, whose single rows inductor streams as it does unquantized ones; other formats join it
    again first, since their kernels stream long rows as well as short ones (int4 on the 1B shape, compiled step:
    39.6 ms a token whole, 41.8 in blocks, measured)."""
    if cfg.mode not in ("none", "int8"):
        join_column_blocks(model)
    blocks = block_linears(model)
    split = sum(len(m.parts) for m in model.layers.modules() if isinstance(m, ColumnBlocks))
    counted = f"{len(blocks)} block linears" + (f" ({split} of them column blocks)" if split else "")
    groups = [(cfg.mode, blocks, counted)]
    if isinstance(model.output, nn.Linear) and cfg.output_mode == cfg.mode:
        groups = [(cfg.mode, [*blocks, (model, "output")], f"{counted} and the output projection")]
    elif isinstance(model.output, nn.Linear):
        groups.append((cfg.output_mode, [(model, "output")], "output projection"))
    device = next(model.parameters()).device
    parts = [_quantize(targets, what, mode, cfg, device, training) for mode, targets, what in groups if mode != "none"]
    # The full-precision weights and the quantization's temporaries, freed in pieces between the kept levels, would
    # otherwise stay resident (1B shape, int8, with the compiled step's column blocks: 2562-3848 MiB, trimmed 2058).
    release_free_memory()
    return "; ".join(parts) if parts else "weights not quantized"


def _quantize(targets: list[tuple[nn.Module, str]], what: str, mode: str, cfg: QuantConfig, device, training) -> str:
    """Replace each (parent, attribute) layer by its mode; describe what was done."""
    kernel = kernel_for(device, mode, training)
    dtype = getattr(targets[0][0], targets[0][1]).weight.dtype
    for parent, name in targets:
        setattr(parent, name, LAYERS[mode](getattr(parent, name), cfg, kernel))
    if mode == "w8a8":
        acts = ", activations to 8 bits per token"
        if kernel == "fbgemm" and FBGEMM_WEIGHT_LEVELS < 127:
            acts += ", weights to 7 bits (no VNNI on this CPU: 8-bit products would saturate)"
    elif kernel != "dequantize":
        acts = f", {DTYPE_NAMES[kernel_dtype(dtype, kernel)]} activations"
    else:
        acts = ""
    weights = f"int4-g{cfg.group_size}" if mode == "int4" else mode
    text = f"{weights} weights ({what}), {kernel} kernel on {device.type}{acts}"
    fallback = sum(getattr(parent, name).kernel != kernel for parent, name in targets)
    if fallback:  # a shape the kernel does not take (int4: rows not a multiple of 64 on CPU, of 8 on CUDA)
        text += f"; {fallback} of them dequantized instead (a shape the {kernel} kernel does not take)"
    return text
