"""Helpers for the fine-tuning tests: a byte-level tokenizer with real special tokens, tiny models, records."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama.checkpoint import save_hf
from llama.model import ModelArgs, Transformer, init_weights
from llama.tokenizer import ByteBPETokenizer, _byte_to_unicode

EOS, PAD, BOS = 256, 257, 258  # ids of <|im_end|>, <|pad|>, <|bos|> after the 256 byte tokens

# Hand-written instruction records (with and without input), not the Alpaca file.
RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "blue"},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Spell cat.", "input": "", "output": "c a t"},
    {"instruction": "Is fire hot?", "input": "", "output": "yes, very"},
]


def byte_tokenizer(bos: bool = False) -> ByteBPETokenizer:
    """One token per byte (no merges) + <|im_end|> as EOS and <|pad|>; <|bos|> as BOS if bos."""
    b2u = _byte_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<|im_end|>", "<|pad|>", "<|bos|>"]
    return ByteBPETokenizer(tokens, [], {EOS, PAD, BOS}, BOS if bos else None, EOS, PAD)


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=259, hidden_dim=64, rope_theta=10000.0, max_seq_len=512
    )
    return ModelArgs(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> Transformer:
    """fp32 random tiny Llama (std 0.1 so the logits are not all alike)."""
    model = Transformer(tiny_args(**kw))
    init_weights(model, seed, std=0.1)
    return model


def write_tiny_checkpoint(folder: Path, seed: int = 0, model: Transformer | None = None) -> Path:
    """A Hugging Face folder (config.json + safetensors + tokenizer.json) that load_checkpoint reads: the tiny
    model of this seed, or `model` (with the byte tokenizer's 259-token vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_hf(model if model is not None else tiny_model(seed), folder)
    b2u = _byte_to_unicode()
    tokenizer = {
        "model": {"type": "BPE", "vocab": {b2u[b]: b for b in range(256)}, "merges": []},
        "added_tokens": [
            {"id": EOS, "content": "<|im_end|>", "special": True},
            {"id": PAD, "content": "<|pad|>", "special": True},
            {"id": BOS, "content": "<|bos|>", "special": True},
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    return folder


def write_records(path: Path, records=RECORDS) -> Path:
    path.write_text(json.dumps(records))
    return path


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
