"""Next-token cross-entropy on the label positions only, through the output projection in chunks.

The plain loss, `cross_entropy(output(h).float(), targets)`, materialises logits for every position
(B, T, V) in the compute dtype, again in fp32, and keeps the log-softmax (N, V) fp32 for backward, although
prompt positions carry no label. On Llama 3.2-1B (V = 128,256) that is 1.5 MiB per position per copy.
Here only positions with a label enter the output projection, and they go through it `rows` at a time:

    forward   per chunk: logits z = h W^T (n, V), fp32 log-sum-exp, loss += sum(lse - z[target])
    backward  dL/dz = softmax(z) - onehot(target), times the incoming scalar gradient;
              dL/dh = dL/dz W,  dL/dW = (dL/dz)^T h

When W is frozen (LoRA) the forward computes dL/dh right away and keeps only that (N, D): no logits survive
the chunk. When W is trained (full fine-tuning; tied to the embeddings in Llama 3.2) the forward keeps the
(N,) log-sum-exp and backward recomputes each chunk's logits, which costs one more output matmul over the
label positions, instead of keeping N x V fp32 values alive through the whole backward pass.
The technique is the one of Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, in
plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama.matmul import linear

CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk: 261 rows for a 128,256-token vocabulary


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _wide(z: torch.Tensor) -> torch.Tensor:
    """Logits for the softmax: fp32 at least (fp64 stays fp64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """(summed loss, logits z (n, V) fp32, their log-sum-exp (n,)) for one chunk: h (n, D), weight (V, D)."""
    z = _wide(linear(h, weight))
    lse = z.logsumexp(dim=-1)
    return (lse - z[torch.arange(len(targets), device=h.device), targets]).sum(), z, lse


def _chunk_grad(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, dloss/dlogits (n, V) fp32) for one chunk: h (n, D), weight (V, D), targets (n,)."""
    loss, z, lse = _chunk_loss(h, weight, targets)
    g = z.sub_(lse[:, None]).exp_()  # softmax, in place on the logits
    g[torch.arange(len(targets), device=h.device), targets] -= 1
    return loss, g


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of softmax(h W^T) against targets; h (N, D) and W (V, D) in one dtype."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.rows = rows
        ctx.weight_grad = weight.requires_grad
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        if ctx.weight_grad:  # backward recomputes the logits; nothing of size V is kept
            for s in range(0, len(targets), rows):
                total += _chunk_loss(h[s : s + rows], weight, targets[s : s + rows])[0]
            ctx.save_for_backward(h, weight, targets)
            return total
        grad_h = torch.empty_like(h)
        for s in range(0, len(targets), rows):
            loss, g = _chunk_grad(h[s : s + rows], weight, targets[s : s + rows])
            total += loss
            grad_h[s : s + rows] = linear(g.to(h.dtype), weight.t())
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.weight_grad:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out.to(grad_h.dtype), None, None, None
        h, weight, targets = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        with torch.autocast(h.device.type, enabled=False):  # a backward() called inside autocast changes nothing
            for s in range(0, len(targets), ctx.rows):
                _, g = _chunk_grad(h[s : s + ctx.rows], weight, targets[s : s + ctx.rows])
                g = (g * grad_out).to(h.dtype)
                grad_h[s : s + ctx.rows] = linear(g, weight.t())
                grad_w.addmm_(g.T, h[s : s + ctx.rows])
        return grad_h, grad_w, None, None


class TiedLookup(torch.autograd.Function):
    """Both uses of a tied weight W (V, D) as one autograd node: the embedding lookup W[tokens] (B, T, D) and W
    itself, for the output projection. Backward gets both gradients at once and adds the lookup's B x T rows into
    the projection's dense (V, D) gradient in place.

    Left to autograd, the two are summed at W: the lookup's gradient is a dense (V, D) tensor (a sparse one would be
    added out of place), so a second V x D buffer is alive at the end of backward, when every other gradient is
    held already: the peak of full fine-tuning, 0.98 GiB of fp32 on the 1B shape.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(tokens)
        ctx.weight_shape = weight.shape
        return F.embedding(tokens, weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_embeddings: torch.Tensor, grad_weight: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        if grad_weight is None:  # the output projection was not used
            grad_weight = grad_embeddings.new_zeros(ctx.weight_shape)
        # In place: the returned W goes to linear_cross_entropy only (loss_sum), whose gradient for it is a fresh
        # buffer that no other node holds. An op handing one gradient tensor to two inputs would not be safe here.
        rows = grad_embeddings.reshape(-1, grad_embeddings.shape[-1]).to(grad_weight.dtype)
        return grad_weight.index_add_(0, tokens.flatten(), rows), None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits h W^T against targets: h (N, D), weight (V, D), targets (N,) -> ().

    Under autocast, h and W enter the matmuls in the autocast dtype (as nn.Linear would); the softmax and the
    loss are fp32 whatever the dtype.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):  # dtypes are chosen here, once, for forward and backward
        return LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets, chunk_rows(weight.shape[0]))
