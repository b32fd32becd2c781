"""The Llama 3.x architecture in plain PyTorch, one file, Meta's parameter names.

Shapes: B batch, T new tokens in this call, S keys visible (cache or prefix), D model dim,
H query heads, K key/value heads, d head dim (D // H), V vocabulary.

Rotary embeddings use Meta's interleaved layout (pairs (0,1), (2,3), ...); the Hugging Face
loader converts q/k rows from HF's rotate-half layout (see `llama/checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .matmul import linear


@dataclass
class RopeScaling:
    """Llama 3 frequency scaling (Llama 3.1 uses factor 8, Llama 3.2 factor 32)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    hidden_dim: Optional[int] = None  # SwiGLU width; derived from multiple_of/ffn_dim_multiplier if None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    rope_freq_factors: Optional[list[float]] = None  # GGUF's rope_freqs tensor: divides each frequency
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.rope_scaling, dict):
            names = {f.name for f in fields(RopeScaling)}
            self.rope_scaling = RopeScaling(**{k: v for k, v in self.rope_scaling.items() if k in names})
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if min(self.dim, self.n_layers, self.n_heads, self.vocab_size, self.hidden_dim, self.max_seq_len) <= 0:
            problems.append("dim, n_layers, n_heads, vocab_size, hidden_dim and max_seq_len must be positive")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        """Build from a dict with this class's field names; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


def eager_inference() -> bool:
    """True where a layer may compute in place on its own temporaries: no autograd keeps them for a backward, and
    torch.compile is not tracing (inductor fuses temporaries away itself). Every large temporary of an eager CPU
    step is fresh memory the allocator maps and the kernel faults in, which costs as much as the arithmetic."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for accuracy, return in the input dtype (as Meta and HF do).
        if not eager_inference() or x.dtype != self.weight.dtype:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return xf.type_as(x) * self.weight
        # The same arithmetic, bit for bit, in place on one fp32 copy (a prefill's normalisations ~2.5x faster).
        xf = x.to(torch.float32, copy=True)
        mean_square = (xf * xf).mean(-1, keepdim=True)
        return xf.mul_(mean_square.add_(self.eps).rsqrt_()).to(x.dtype).mul_(self.weight)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(d/2,) fp32 inverse frequencies, with Llama 3 scaling applied when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen < high_wavelen, inv_freq, torch.where(wavelen > low_wavelen, inv_freq / s.factor, smoothed)
        )
    if args.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float64)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, heads, d) by angles given as cos/sin (B, T, 1, d/2), in fp32."""
    if eager_inference() and x.device.type in ("cpu", "cuda"):
        # Each pair as one complex number, times e^(i angle): one kernel where the real form below takes eight
        # (a prefill's rotations ~4x faster); it rounds within an fp32 ulp of the real form (FMA), as Meta's does.
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Fixed (B, K, max_len, d) key and value buffers, written in place at each call's positions."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, d) at [start_pos, start_pos+T); return views of all keys so far.

        start_pos a tensor (T,) of positions (Transformer.step): store there and return the whole buffers, whose
        shapes never change (the caller masks the keys not yet written)."""
        if torch.is_tensor(start_pos):
            self.k.index_copy_(2, start_pos, k)
            self.v.index_copy_(2, start_pos, v)
            return self.k, self.v
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# x -> a copy of x, which inductor computes once, into memory (lower_materialize). Without it a compiled single-row
# product would recompute its input (an RMSNorm, a SiLU gate) inside the loop over weight rows, once per output.
_OPS = torch.library.Library("efficient_llama", "FRAGMENT")
_OPS.define("materialize(Tensor x) -> Tensor")
_OPS.impl("materialize", lambda x: x.clone(), "CPU")
torch.library.register_fake("efficient_llama::materialize")(lambda x: torch.empty_like(x))


@functools.cache
def lower_materialize():
    """Give inductor a lowering for efficient_llama::materialize: its input is realized (computed into a buffer of
    the compiled code) and passed on, so the op costs no call at all. Without one inductor calls the operator's
    Python kernel, 121 times a step on the default model: 12.84 -> 12.45 ms a token in bf16, 10.09 -> 9.61 with
    int8 (compiled batch-1 step, one process, medians of 10 interleaved calls, AMD EPYC, 2 threads). Registered
    when a step is compiled, since importing inductor takes ~2 s."""
    from torch._inductor.lowering import register_lowering

    @register_lowering(torch.ops.efficient_llama.materialize.default, type_promotion_kind=None)
    def _realized(x):
        x.realize()
        return x


def row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) holding a single row, weight (N, K) -> (..., N) fp32: the row times each weight row, summed in fp32
    (as the matmul kernels do), written so that inductor makes it one loop that streams the weight once. The row is
    materialized first, in fp32, so that loop neither recomputes it nor converts it per weight row (an int8 weight
    streamed at ~22 GB/s with a bf16 row, ~28 with an fp32 one; bf16 weights ~29 either way)."""
    x_row = torch.ops.efficient_llama.materialize(x.float())
    return (x_row.unsqueeze(-2) * weight.float()).sum(-1)


class Linear(nn.Linear):
    """nn.Linear without bias whose single-row products, in a compiled decode step on CPU, are written as a multiply
    and a sum along each weight row: inductor turns that into one loop that streams the weight, at up to twice the
    rate of PyTorch's own CPU matrix-vector kernel (bf16 and fp32, weights of 2048 columns; README, "One row, one
    pass over each weight"). Everywhere else it is llama.matmul.linear: F.linear, with fp32 on CPU through the faster
    of PyTorch's two CPU GEMM libraries."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            return row_product(x, self.weight).to(x.dtype)  # rounded to x's dtype once
        return linear(x, self.weight)


LONG_ROW = 4096  # a compiled CPU decode step holds a w2 with longer rows as column blocks (ColumnBlocks)


class ColumnBlocks(nn.Module):
    """A bias-free linear layer (N, K) held as K / C blocks of C columns, each its own contiguous (N, C) layer:
    y = sum_j x[..., jC:(j+1)C] W_j^T, the blocks' products summed in fp32 and rounded to x's dtype once.

    For a compiled CPU decode step, on weights whose rows are longer than LONG_ROW (Llama 3's w2: 8192 columns in
    the 1B and 3B, 14336 in the 8B; Llama.build). That step multiplies a single row by such a weight at ~16 GB/s
    in bf16 and ~13 in int8, where rows of 2048 stream at ~27 and ~26 (inductor's single-row products, 2 threads,
    AMD EPYC with AVX-512; `Linear`), and reading one block's columns out of the long rows in place was slower
    still (4 KB runs at a 16 KB stride: ~12 GB/s). The blocks are plain layers, so quantize() quantizes each one
    (int8: a scale per output channel and block) or joins them again (formats whose kernels stream long rows well;
    project/quant.py)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.block = parts[0].in_features
        self.in_features, self.out_features = self.block * len(parts), parts[0].out_features

    @staticmethod
    def split(layer: Linear, block: int) -> ColumnBlocks:
        """layer (N, K) -> its K / block column blocks (block must divide K), views of one (K / block, N, block)
        tensor: a single copy of the weight."""
        w = layer.weight.detach()
        stacked = w.view(w.shape[0], -1, block).transpose(0, 1).contiguous()
        return ColumnBlocks([_frozen(cols) for cols in stacked])

    def joined(self) -> Linear:
        """The one (N, K) Linear these blocks hold (before quantization: its parts are Linear)."""
        return _frozen(torch.cat([part.weight.detach() for part in self.parts], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        y = None
        for part, cols in zip(self.parts, x.split(self.block, dim=-1)):  # views: every layer takes strided rows
            p = part(cols).float()
            y = p if y is None else y.add_(p)
        return y.to(x.dtype)


def row_block(k: int, long_row: int = LONG_ROW) -> Optional[int]:
    """The widest block of long_row // 8 to long_row // 2 columns that divides k (2048 for 8192 or 14336 columns),
    or None (such rows stay whole). Measured on the 1B shape's compiled bf16 step (one process, interleaved, median
    ms a token): w2 whole 96.5, in blocks of 4096 92.9, of 2048 83.8, of 1024 84.4."""
    return next((c for c in range(long_row // 2, long_row // 8 - 1, -1) if k % c == 0), None)


def attend_by_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention written as sums: q (B, K, G, d), k and v (B, K, S, d), mask None or bool broadcastable to
    (B, K, G, S) -> (B, K, G, d) in q's dtype, in fp32 throughout as SDPA's CPU kernels are.

    For a compiled CPU decode step: inductor fuses these into the layer's own loops, where SDPA is a separate
    kernel call costing ~90 us per layer whatever the work (SmolLM2, bf16, 2 threads; README, "One row, one pass
    over each weight")."""
    scores = (q.unsqueeze(-2).float() * k.unsqueeze(-3).float()).sum(-1) * q.shape[-1] ** -0.5  # (B, K, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1)
    return (p.unsqueeze(-1) * v.unsqueeze(-3).float()).sum(-2).to(q.dtype)


SHORT_SEQUENCE = 128  # on CPU, attention over at most this many queries takes SDPA's math backend (attend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Grouped-query SDPA: q (B, H, T, d), k and v (B, K, S, d), mask None (plain causal, queries from position 0)
    or bool (B, 1, T, S) -> (B, H, T, d).

    On CPU, for up to SHORT_SEQUENCE queries, through SDPA's math backend (matmuls and a softmax) rather than its
    flash kernel, whose backward is slow on short sequences: a 1B-shape layer's attention, forward and backward
    under bf16 autocast, took 5.5 ms flash and 2.4 ms math at 76 tokens, but 54 and 105 ms at 512, where the flash
    kernel stays (and holds no T x T probabilities for backward). An amp+lora micro-batch of 76 tokens: ~5 % less
    time (1.29-1.30 s against 1.34-1.47 s, two pairs of runs, AMD EPYC, 2 threads)."""
    short = q.device.type == "cpu" and q.shape[-2] <= SHORT_SEQUENCE
    with sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (H // K queries per group)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.wqkv: Optional[Linear] = None  # wq, wk, wv stacked into one matmul (fuse_projections, inference)
        self.cache: Optional[KVCache] = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, T, H*d), k and v (B, T, K*d)."""
        if self.wqkv is not None:
            kv = self.n_kv_heads * self.head_dim
            return self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, start_pos, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, D); start_pos int, or positions (T,) for Transformer.step; mask None (plain causal) or bool
        (B, 1, T, S), True where attending is allowed."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        if T == 1:
            # One new token may attend to every cached key (mask, if any, hides padding). Folding each
            # group's H // K query heads into the query length makes this plain K-head attention, which on
            # CPU runs several times faster than SDPA's grouped-query path (in bf16 especially).
            # (SDPA's CUDA kernels return the output (B, K, H // K, hd) in another memory order: reshape, not view.)
            q = q.reshape(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            if torch.compiler.is_compiling() and x.device.type == "cpu":
                out = attend_by_sums(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.wo(out.reshape(B, 1, -1))
        # Without a mask the queries start at position 0: plain causal.
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)
        self.w13: Optional[Linear] = None  # w1 and w3 stacked into one matmul (fuse_projections, inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            if eager_inference():
                return self.w2(F.silu(gate, inplace=True).mul_(up))
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos: int, mask):
        h = add_residual(x, self.attention(self.attention_norm(x), cos, sin, start_pos, mask))
        return add_residual(h, self.feed_forward(self.ffn_norm(h)))


def add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, summed into the branch's own fresh output where eager_inference() allows and the dtypes agree
    (under autocast an fp32 stream plus a bf16 branch must become fp32)."""
    if eager_inference() and branch.dtype == x.dtype:
        return branch.add_(x)
    return x + branch


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self, device=None):
        """Recompute the rotary frequencies (needed after building the model on the meta device)."""
        self.inv_freq = rope_inv_freq(self.args).to(device or self.tok_embeddings.weight.device)

    # ---- KV cache -------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int):
        """Allocate one (batch, max_len) KV cache per layer, in the weights' dtype and device."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def cache_nbytes(self) -> int:
        return sum(l.attention.cache.nbytes() for l in self.layers if l.attention.cache is not None)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        pad_lens: Optional[torch.Tensor] = None,
        last_only: bool = False,
        hidden: bool = False,
        embeddings: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens (B, T) at positions [start_pos, start_pos+T) -> logits (B, T, V), or (B, 1, V) if last_only.

        hidden: return the final-normed hidden states (B, T, D) instead, for a loss that applies the output
        projection itself, only where there are labels (project/loss.py).
        embeddings (B, T, D): the tokens' embeddings, looked up by the caller (project/loss.py's tied lookup).

        pad_lens (B,) counts left-padding tokens per row (batched generation of unequal prompts):
        a row's positions start after its padding, and no query attends to a padding key.
        With the KV cache on, keys 0..start_pos-1 come from the cache; with it off, start_pos must be 0.
        """
        B, T = tokens.shape
        cached = self.layers[0].attention.cache is not None
        if start_pos and not cached:
            raise ValueError("start_pos > 0 needs the KV cache (call setup_cache first)")
        pos = torch.arange(start_pos, start_pos + T, device=tokens.device)
        mask = None
        # SDPA's is_causal aligns queries with the first keys, which is right only when the queries start at
        # position 0 (or are a single token); several new tokens after cached ones need an explicit mask.
        if pad_lens is not None or (start_pos > 0 and T > 1):
            keys = torch.arange(start_pos + T, device=tokens.device)
            mask = keys[None, None, :] <= pos[None, :, None]  # (1, T, S)
            if pad_lens is not None:
                mask = mask & (keys[None, None, :] >= pad_lens[:, None, None])
                # A padding query sees only itself: a row of -inf would give NaN, and NaN * 0 is still NaN.
                mask = mask | (keys[None, None, :] == pos[None, :, None])
            mask = mask.unsqueeze(1)  # (B or 1, 1, T, S)
        if pad_lens is not None:
            pos = (pos[None, :] - pad_lens[:, None]).clamp(min=0)  # (B, T)
        else:
            pos = pos[None, :].expand(B, T)
        cos, sin = self.rotary(pos)

        h = self.tok_embeddings(tokens) if embeddings is None else embeddings
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        if last_only:
            h = h[:, -1:, :]
        h = self.norm(h)
        return h if hidden else self.output(h)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token positions (B, T) -> cos, sin (B, T, 1, d/2) of their rotary angles."""
        angles = positions[..., None].float() * self.inv_freq  # (B, T, d/2)
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, pad_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode step with static shapes, for torch.compile: tokens (B, 1) at position pos (1,) -> logits
        (B, 1, V).

        The same computation as forward(tokens, pos, pad_lens) with the KV cache on, but the position is a tensor
        and attention reads the whole cache, masking the keys after pos (and each row's padding): every step has
        the same shapes, so a compiled step is compiled once and not again for each position."""
        B = tokens.shape[0]
        keys = torch.arange(self.layers[0].attention.cache.k.shape[2], device=tokens.device)
        mask = (keys <= pos)[None, :]  # (1, S)
        rows = pos[None, :].expand(B, 1)
        if pad_lens is not None:
            mask = mask & (keys[None, :] >= pad_lens[:, None])  # (B, S)
            rows = (rows - pad_lens[:, None]).clamp(min=0)
        cos, sin = self.rotary(rows)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, pos, mask[:, None, None, :])
        return self.output(self.norm(h))


def fuse_projections(model: Transformer, long_row: Optional[int] = None) -> Transformer:
    """For inference: stack each block's wq, wk, wv into one wqkv and w1, w3 into one w13, and (if long_row is
    given) hold a w2 whose rows are longer than long_row as ColumnBlocks, in place.

    Fewer, larger matmuls (4 instead of 7 per block) cost less per call at decode, where each call is a
    matrix-vector product dominated by its fixed overhead; the arithmetic is the same. A long-rowed w2 is summed
    block by block instead (ColumnBlocks), for a compiled CPU step's single rows. The fused model's
    state_dict has other names, so fuse after loading and never before saving, LoRA or training."""
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        if a.wqkv is not None:
            continue
        if not all(type(m) is Linear for m in (a.wq, a.wk, a.wv, f.w1, f.w3)):
            raise ValueError("fuse_projections needs plain nn.Linear projections (fuse before LoRA or quantization)")
        a.wqkv, f.w13 = _stacked(a.wq, a.wk, a.wv), _stacked(f.w1, f.w3)
        del a.wq, a.wk, a.wv, f.w1, f.w3
        if long_row and type(f.w2) is Linear and f.w2.in_features > long_row:
            block = row_block(f.w2.in_features, long_row)
            if block:
                f.w2 = ColumnBlocks.split(f.w2, block)
    return model


def _stacked(*linears: Linear) -> Linear:
    """One bias-free Linear whose output is the linears' outputs side by side."""
    return _frozen(torch.cat([m.weight.detach() for m in linears]))


def _frozen(weight: torch.Tensor) -> Linear:
    """A bias-free Linear holding weight (out, in) itself, without gradient."""
    layer = Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02):
    """Random weights (normal, std 0.02; norms at one) for performance work on a real shape."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                # Fill in fp32 chunks so a bf16 model never needs a full fp32 copy.
                flat = p.view(-1)
                for i in range(0, flat.numel(), 1 << 24):
                    chunk = flat[i : i + (1 << 24)]
                    chunk.copy_(torch.randn(chunk.numel(), generator=g) * std)
