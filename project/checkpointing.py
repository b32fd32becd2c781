"""Gradient-checkpointing policy: which transformer blocks recompute their activations in backward.

A checkpointed block keeps only its input (B, T, D) for backward and runs its forward again there,
so its saved activations (attention and SwiGLU intermediates, about 10x D + 3x hidden per token) are
freed after the forward, at the cost of one more forward through that block (~1/3 more compute).

Policies: "none"; "all" (every block); "every-k" (blocks 0, k, 2k, ...); "sqrt" (ceil(sqrt(n)) blocks,
evenly spread) - a middle point between the two ends.
"""
from __future__ import annotations

import math

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


def apply_checkpointing(model, policy: str) -> set[int]:
    """Set model.checkpoint_blocks from the policy; returns the chosen block indices."""
    model.checkpoint_blocks = checkpoint_blocks(policy, len(model.layers))
    return model.checkpoint_blocks
