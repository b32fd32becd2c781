"""Shared test helpers: tiny random models, a minimal tokenizer, and the default model loaded once per module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import DEFAULT_CKPT_DIR, LLAMA3_TOKENIZER, REPO_ROOT, load_checkpoint
from llama.model import ModelArgs, RopeScaling, Transformer

# Llama 3 scaling that matters in a tiny model: with head dim 16 and theta 10000 the wavelengths run from
# 6 to 20,000 positions, so original_max_position_embeddings=64 puts frequencies on both sides of, and
# between, the low/high cut-offs (16 and 64 positions), and test sequences run past position 64.
TINY_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def tiny_args(**overrides) -> ModelArgs:
    """A 2-layer GQA model (4 query heads, 2 kv heads, head dim 16) with Llama 3 rope scaling."""
    kw = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        hidden_dim=96,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=TINY_ROPE,
        max_seq_len=128,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return ModelArgs(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Fill every parameter (norm weights too, so swapped norms show) with values large enough that
    logits span several units and greedy decoding does not settle on one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random fp32 `Transformer(tiny_args(**overrides))` in eval mode."""
    torch.manual_seed(seed)
    return randomize_(Transformer(tiny_args(**overrides)), seed).eval()


class ToyTokenizer:
    """Just enough of the tokenizer interface for `Llama.generate` on a tiny model: ids are bytes."""

    def __init__(self, stop_ids=(), pad_id=0):
        self.bos_id, self.eos_id, self.pad_id = None, None, pad_id
        self.stop_ids = set(stop_ids)
        self.n_words = 256

    def encode(self, s, bos=False, eos=False):
        return list(s.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


@pytest.fixture(scope="module")
def default_model():
    """(model, tokenizer) of the embedded default (SmolLM2-135M-Instruct GGUF) in fp32 on CPU, once per module."""
    if not any(DEFAULT_CKPT_DIR.glob("*.gguf")):
        pytest.fail(f"default model missing in {DEFAULT_CKPT_DIR}: run `make setup`")
    return load_checkpoint(None, torch.float32, "cpu")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    if not LLAMA3_TOKENIZER.exists():
        pytest.fail(f"{LLAMA3_TOKENIZER} missing: run `make setup`")
    return LLAMA3_TOKENIZER


def run_script(*args, timeout=600) -> subprocess.CompletedProcess:
    """Run `python <args>` in the repository root the way a user would, capturing text output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
