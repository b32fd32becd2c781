"""Gradient checkpointing: a policy picks the transformer blocks that recompute their activations in backward.

A checkpointed block keeps only its input (B, T, D) for backward and runs its forward again there,
so its saved activations (attention and SwiGLU intermediates, about 10x D + 3x hidden per token) are
freed after the forward, at the cost of one more forward through that block (~1/3 more compute).

`apply_checkpointing` wraps the chosen blocks: each one's forward is replaced, on that instance only, by one that
runs the block's own forward under `torch.utils.checkpoint.checkpoint(use_reentrant=False)` while autograd is
recording, and plainly otherwise (e.g. generation under inference_mode). The model (llama/model.py) knows nothing
of it, and no module is added, so parameter names and state_dict keys stay the same.

Policies: "none"; "all" (every block); "every-k" (blocks 0, k, 2k, ...); "sqrt" (ceil(sqrt(n)) blocks,
evenly spread) - a middle point between the two ends.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from llama.errors import UserError

POLICIES = "none, all, every-K (e.g. every-2) or sqrt"


def checkpoint_blocks(policy: str, n_layers: int) -> set[int]:
    """The indices of the blocks to checkpoint under policy, for a model of n_layers blocks."""
    policy = str(policy).lower()
    if policy == "none":
        return set()
    if policy == "all":
        return set(range(n_layers))
    if policy == "sqrt":
        count = math.ceil(math.sqrt(n_layers))
        return {round(i * n_layers / count) for i in range(count)}
    if policy.startswith("every-"):
        try:
            k = int(policy.removeprefix("every-"))
        except ValueError:
            k = 0
        if k >= 1:
            return set(range(0, n_layers, k))
    raise UserError(f"unknown --grad_ckpt policy {policy!r}: use {POLICIES}")


def _checkpointed_forward(block, *args, **kwargs):
    """The block's own (class) forward, checkpointed while autograd records; plain under no_grad/inference_mode."""
    forward = type(block).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


def is_checkpointed(block) -> bool:
    """Whether apply_checkpointing has wrapped this block."""
    wrapper = vars(block).get("forward")
    return isinstance(wrapper, functools.partial) and wrapper.func is _checkpointed_forward


def apply_checkpointing(model, policy: str) -> set[int]:
    """Checkpoint the blocks of model.layers chosen by policy, replacing any earlier choice ("none" unwraps all).

    Returns the chosen block indices. Only each block instance's `forward` attribute changes: parameters, their
    names and the state_dict are untouched. The block's forward hooks run once per call, outside the checkpoint.
    """
    chosen = checkpoint_blocks(policy, len(model.layers))
    for i, block in enumerate(model.layers):
        if is_checkpointed(block):
            del block.forward  # back to the class's forward
        if i in chosen:
            block.forward = functools.partial(_checkpointed_forward, block)
    return chosen
