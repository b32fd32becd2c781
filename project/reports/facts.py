"""Facts the reports quote, computed from the code rather than typed: model numbers, source links, environment."""

from __future__ import annotations

import math
import platform
import re
from functools import lru_cache
from pathlib import Path

import torch

from llama.checkpoint import LLAMA3_TOKENIZER, REPO_ROOT, SHAPES
from llama.model import Transformer, rope_inv_freq
from project.bench.harness import git_commit

SHAPE = "llama3.2-1b"


# ---- links into the source ----------------------------------------------------------------------
def find_symbol(path: str, symbol: str, root: Path = REPO_ROOT) -> int | None:
    """1-based line of `class X` / `def X` in path; a dotted `Class.method` looks for the method inside Class."""
    file = root / path
    if not file.exists():
        return None
    lines = file.read_text().splitlines()
    start, indent = 0, -1
    for part in symbol.split("."):
        pattern = re.compile(rf"^(\s*)(?:async\s+)?(?:class|def)\s+{re.escape(part)}\b")
        for i in range(start, len(lines)):
            m = pattern.match(lines[i])
            if m and len(m.group(1)) > indent:
                start, indent = i, len(m.group(1))
                break
            # Leaving the enclosing class without finding the method: give up.
            if indent >= 0 and i > start and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent:
                return None
        else:
            return None
    return start + 1


def link(path: str, symbol: str | None = None, root: Path = REPO_ROOT, warnings: list | None = None) -> str:
    """Markdown link from reports/ to a file, and to the line that defines `symbol` when it is found."""
    if not (root / path).exists():
        if warnings is not None:
            warnings.append(f"{path} does not exist (yet)")
        return f"`{path}`" + (f" `{symbol}`" if symbol else "") + " (not written yet)"
    if symbol is None:
        return f"[`{path}`](../{path})"
    line = find_symbol(path, symbol, root)
    if line is None:
        if warnings is not None:
            warnings.append(f"{symbol} not found in {path}")
        return f"[`{path}`](../{path}) (`{symbol}`)"
    return f"[`{path}` › `{symbol}`](../{path}#L{line})"


def find_line(path: str, text: str, root: Path = REPO_ROOT) -> int | None:
    """1-based line of the first line of path containing text."""
    file = root / path
    if not file.exists():
        return None
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if text in line:
            return i
    return None


# ---- environment --------------------------------------------------------------------------------
def environment() -> dict:
    import fpdf

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fpdf2": fpdf.__version__,
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }


# ---- Llama 3.2-1B numbers, computed from SHAPES on the meta device (no memory, no weights) --------
def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=1)
def llama_1b() -> dict:
    args = SHAPES[SHAPE]
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    block = model.layers[0]
    total = _count(model)
    embed = model.tok_embeddings.weight.numel()
    attn, ffn = _count(block.attention), _count(block.feed_forward)
    norms = _count(block.attention_norm) + _count(block.ffn_norm)
    model.setup_cache(1, 1)
    kv_bytes_per_token = model.cache_nbytes()  # one position, every layer, keys + values, bf16
    model.clear_cache()
    mha_kv_bytes_per_token = kv_bytes_per_token * args.n_heads // args.n_kv_heads
    inv = rope_inv_freq(args).double()
    plain = rope_inv_freq(type(args)(**{**args.__dict__, "rope_scaling": None})).double()
    ratio = plain / inv
    s = args.rope_scaling
    lora_r = 16
    lora = sum(
        lora_r * (m.in_features + m.out_features) for l in model.layers for m in (l.attention.wq, l.attention.wv)
    )
    wavelengths = 2 * math.pi / plain
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "gqa_group": args.n_heads // args.n_kv_heads,
        "head_dim": args.head_dim,
        "kv_dim": args.n_kv_heads * args.head_dim,
        "hidden_dim": args.hidden_dim,
        "ffn_ratio": args.hidden_dim / args.dim,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "rope_factor": s.factor,
        "rope_low": s.low_freq_factor,
        "rope_high": s.high_freq_factor,
        "rope_original": s.original_max_position_embeddings,
        "rope_pairs": inv.numel(),
        "rope_pairs_kept": int((ratio < 1 + 1e-9).sum()),
        "rope_pairs_divided": int((ratio > s.factor - 1e-6).sum()),
        "rope_pairs_smoothed": int(((ratio > 1 + 1e-9) & (ratio < s.factor - 1e-6)).sum()),
        "rope_shortest_wavelength": float(wavelengths.min()),
        "rope_longest_wavelength": float(wavelengths.max()),
        "max_seq_len": args.max_seq_len,
        "tied": args.tie_word_embeddings,
        "norm_eps": args.norm_eps,
        "params": total,
        "embed_params": embed,
        "embed_share": embed / total,
        "block_params": _count(block),
        "attn_params": attn,
        "ffn_params": ffn,
        "block_norm_params": norms,
        "norm_params": sum(_count(m) for n, m in model.named_modules() if n.endswith("norm")),
        "kv_bytes_per_token": kv_bytes_per_token,
        "mha_kv_bytes_per_token": mha_kv_bytes_per_token,
        "lora_r": lora_r,
        "lora_params": lora,
        "lora_share": lora / total,
    }


def cross_entropy_example(probs=(0.1, 0.7, 0.2)) -> dict:
    """-ln p(answer) for the worked example, with the answer the third and then the second word."""
    return {
        "probs": probs,
        "third": -math.log(probs[2]),
        "second": -math.log(probs[1]),
        "uniform": math.log(len(probs)),
    }


def tokenizer_example(text: str = "Efficient LLaMA fine-tunes on one machine.") -> dict | None:
    """The real Llama 3 tokenizer's pieces for a sentence (None when its file has not been fetched)."""
    if not Path(LLAMA3_TOKENIZER).exists():
        return None
    from llama.tokenizer import Llama3Tokenizer

    tok = Llama3Tokenizer(LLAMA3_TOKENIZER)
    ids = tok.encode(text, bos=True)
    return {
        "text": text,
        "ids": ids,
        "pieces": [tok.decode([i]) for i in ids],
        "n_words": tok.n_words,
        "n_special": len(tok.special_tokens),
    }
