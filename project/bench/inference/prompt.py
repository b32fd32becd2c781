"""Prompts of exactly the requested number of tokens, identical for every configuration."""

from __future__ import annotations

import hashlib
import json

PASSAGE = (
    "The history of computing is a history of trade-offs between memory and time. Early machines stored "
    "programs on punched cards and paper tape; later ones kept them in magnetic cores, then in transistors "
    "packed ever more densely onto silicon. Each generation of engineers asked the same question: what is "
    "worth remembering, and what is cheaper to compute again? A language model that writes one word at a "
    "time faces that question at every step. It can recompute what it has already read, or it can keep the "
    "keys and values of every earlier word and pay for that in memory. "
)


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """n token ids: BOS (if the model uses one) followed by the passage's ids, repeated and cut to length.

    Built at the token level so the length is exact, whatever the tokenizer does at the seams."""
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = tokenizer.encode(PASSAGE)
    ids = head + body * (n // len(body) + 1)
    return ids[:n]


def tokens_sha(tokens) -> str:
    """A short fingerprint of a list of token id lists, to compare runs without storing every token."""
    return hashlib.sha256(json.dumps([[int(t) for t in row] for row in tokens]).encode()).hexdigest()[:16]
