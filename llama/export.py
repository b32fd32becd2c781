"""A model and its tokenizer in the formats other tools read: a Hugging Face folder and a GGUF file.

- `save_hf_folder`: config.json + model.safetensors (llama/checkpoint.py's save_hf) and the tokenizer files
  transformers' AutoTokenizer reads: tokenizer.json (byte-level BPE, written here from our tokenizer's
  vocabulary and merges), tokenizer_config.json, generation_config.json (every stop token). A SentencePiece
  tokenizer is copied as tokenizer.model.
- `save_gguf`: one GGUF file for llama.cpp-based tools (llama.cpp's own `gguf` package writes it): the
  architecture fields, the "gpt2" (byte-level BPE) tokenizer, Llama 3 rope scaling as the `rope_freqs`
  tensor, weights in F32, F16, BF16 or Q8_0 (norms stay F32). q/k rows keep Meta's interleaved layout,
  which is GGUF's.

A Llama 3 tiktoken file has ranks, not merges: the merges are recovered the way transformers' TikTokenConverter
does (every split of a token into two tokens of lower rank, in rank order) and the tokenizer ignores merges for
words that are whole tokens (`ignore_merges`, tiktoken's own rule), as Meta's published tokenizer.json does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .checkpoint import GGUF_NAMES, atomic_path, atomic_write, save_hf
from .errors import UserError
from .model import Transformer, rope_inv_freq
from .tokenizer import ByteBPETokenizer, Llama3Tokenizer, SentencePieceTokenizer, _byte_to_unicode

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class BPEVocab:
    """A byte-level BPE tokenizer as data: what tokenizer.json and GGUF's tokenizer fields both hold."""

    tokens: list[str]  # id -> token, bytes spelled with GPT-2's byte-to-unicode table; special tokens as text
    merges: list[str]  # "left right", by rank
    special_ids: list[int]
    pattern: str  # the pre-tokeniser's split regex
    split_digits: bool  # digits split one by one before the regex (SmolLM)
    ignore_merges: bool  # a word that is a whole token is that token (tiktoken, Llama 3)
    bos_id: int | None  # None: no BOS is added
    eos_id: int
    pad_id: int | None
    stop_ids: list[int]
    chat_template: str | None


def require_bpe(tokenizer):
    """Refuse at once (before training) a tokenizer GGUF's "gpt2" model cannot hold."""
    if not isinstance(tokenizer, (ByteBPETokenizer, Llama3Tokenizer)):
        raise UserError(f"GGUF export writes byte-level BPE tokenizers; this model has a {type(tokenizer).__name__}")


def bpe_vocab(tokenizer) -> BPEVocab:
    require_bpe(tokenizer)
    if isinstance(tokenizer, ByteBPETokenizer):
        return BPEVocab(
            tokens=list(tokenizer.tokens),
            merges=[f"{a} {b}" for (a, b), _ in sorted(tokenizer.merge_ranks.items(), key=lambda kv: kv[1])],
            special_ids=sorted(tokenizer.special_ids),
            pattern=tokenizer._words.pattern,
            split_digits=tokenizer._digits is not None,
            ignore_merges=False,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            stop_ids=sorted(tokenizer.stop_ids),
            chat_template=tokenizer.chat_template,
        )
    # A Llama 3 tiktoken file: ranks are ids, and the merges are recovered from them.
    ranks = tokenizer.mergeable_ranks
    b2u = _byte_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    tokens = [""] * tokenizer.n_words
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
    for name, i in tokenizer.special_tokens.items():
        tokens[i] = name
    return BPEVocab(
        tokens=tokens,
        merges=[f"{spell(a)} {spell(b)}" for a, b in tiktoken_merges(ranks)],
        special_ids=sorted(tokenizer.special_tokens.values()),
        pattern=tokenizer.pat_str,
        split_digits=False,
        ignore_merges=True,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        stop_ids=sorted(tokenizer.stop_ids),
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


# Llama 3's chat format (llama/tokenizer.py, Llama3Tokenizer.encode_dialog) as a Jinja template.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of a rank table: for each token, every split into two tokens, ordered by the token's rank,
    then by the parts' ranks (transformers' TikTokenConverter)."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort(key=lambda m: m[:3])
    return [(a, b) for *_, a, b in merges]


# ---- Hugging Face --------------------------------------------------------------------------------------
def tokenizer_json(v: BPEVocab) -> dict:
    """The `tokenizers` library's file: BPE model, pre-tokeniser (digits, regex, byte-level), BOS template."""
    pre = [{"type": "Digits", "individual_digits": True}] if v.split_digits else []
    pre += [
        {"type": "Split", "pattern": {"Regex": v.pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]
    post = None
    if v.bos_id is not None:
        bos = v.tokens[v.bos_id]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [v.bos_id], "tokens": [bos]}},
        }
    special = set(v.special_ids)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": v.tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in v.special_ids
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": v.ignore_merges,
            "vocab": {t: i for i, t in enumerate(v.tokens) if i not in special},
            "merges": v.merges,
        },
    }


def save_tokenizer_files(tokenizer, folder: Path):
    """tokenizer.json, tokenizer_config.json and generation_config.json (or tokenizer.model for SentencePiece);
    a Llama 3 tokenizer also keeps its tiktoken file as original/tokenizer.model, where Meta's HF folders have it."""
    if isinstance(tokenizer, Llama3Tokenizer):
        (folder / "original").mkdir(exist_ok=True)
        atomic_write(folder / "original" / "tokenizer.model", tokenizer.model_path.read_bytes())
    if isinstance(tokenizer, SentencePieceTokenizer):
        atomic_write(folder / "tokenizer.model", tokenizer.model_path.read_bytes())
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
        atomic_write(folder / "tokenizer_config.json", json.dumps(cfg, indent=2))
        return
    v = bpe_vocab(tokenizer)
    atomic_write(folder / "tokenizer.json", json.dumps(tokenizer_json(v), ensure_ascii=False))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": v.tokens[v.bos_id] if v.bos_id is not None else None,
        "add_bos_token": v.bos_id is not None,
        "eos_token": v.tokens[v.eos_id],
        "pad_token": v.tokens[v.pad_id] if v.pad_id is not None else None,
        "chat_template": v.chat_template,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write(folder / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
    generation = {"bos_token_id": v.bos_id, "eos_token_id": v.stop_ids}
    atomic_write(folder / "generation_config.json", json.dumps(generation, indent=2))


def save_hf_folder(model: Transformer, tokenizer, folder: str | Path) -> Path:
    """A folder AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load (and so does ours)."""
    if model.args.rope_freq_factors is not None:
        raise UserError("this model's rope frequencies come from a GGUF rope_freqs tensor; HF config cannot say so")
    folder = Path(folder)
    save_hf(model, folder)
    save_tokenizer_files(tokenizer, folder)
    return folder


# ---- GGUF -------------------------------------------------------------------------------------------------
META_TO_GGUF = {ours: theirs for theirs, ours in GGUF_NAMES.items()}


def gguf_name(name: str) -> str:
    """layers.3.attention.wq.weight -> blk.3.attn_q.weight; norm.weight -> output_norm.weight."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{META_TO_GGUF['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{META_TO_GGUF[parts[0]]}.{parts[1]}"


def pre_tokenizer_name(v: BPEVocab) -> str:
    """llama.cpp's name for the pre-tokeniser (what llama/tokenizer.py's from_gguf_fields reads back)."""
    if v.pattern == Llama3Tokenizer.pat_str:
        return "llama-bpe"
    return "smollm" if v.split_digits else "gpt2"


def rope_freq_factors(model: Transformer) -> list[float] | None:
    """GGUF's rope_freqs: what each unscaled rotary frequency is divided by (None: no scaling)."""
    a = model.args
    if a.rope_scaling is None and a.rope_freq_factors is None:
        return None
    plain = rope_inv_freq(replace(a, rope_scaling=None, rope_freq_factors=None)).double()
    return (plain / rope_inv_freq(a).double()).tolist()


def save_gguf(model: Transformer, tokenizer, path: str | Path, weight_type: str = "f16") -> Path:
    """Write model (weights as weight_type, one of GGUF_TYPES) and its tokenizer to one GGUF file."""
    import gguf
    from gguf.quants import quantize

    if weight_type not in GGUF_TYPES:
        raise UserError(f"GGUF weight type must be one of {', '.join(GGUF_TYPES)}, not {weight_type!r}")
    a, v = model.args, bpe_vocab(tokenizer)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[weight_type]
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[weight_type]  # llama.cpp's LLAMA_FTYPE_*
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(path.stem)
        w.add_context_length(a.max_seq_len)
        w.add_embedding_length(a.dim)
        w.add_block_count(a.n_layers)
        w.add_feed_forward_length(a.hidden_dim)
        w.add_head_count(a.n_heads)
        w.add_head_count_kv(a.n_kv_heads)
        w.add_rope_freq_base(a.rope_theta)
        w.add_rope_dimension_count(a.head_dim)
        w.add_layer_norm_rms_eps(a.norm_eps)
        w.add_vocab_size(a.vocab_size)
        w.add_file_type(file_type)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(v))
        w.add_token_list(v.tokens)
        special = set(v.special_ids)
        kinds = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(v.tokens))]
        w.add_token_types(kinds)
        w.add_token_merges(v.merges)
        if v.bos_id is not None:
            w.add_bos_token_id(v.bos_id)
        w.add_add_bos_token(v.bos_id is not None)
        w.add_eos_token_id(v.eos_id)
        if v.pad_id is not None:
            w.add_pad_token_id(v.pad_id)
        for i in v.stop_ids:  # GGUF has one field for each kind of stop token besides EOS
            if i != v.eos_id:
                (w.add_eom_token_id if v.tokens[i] == "<|eom_id|>" else w.add_eot_token_id)(i)
        if v.chat_template:
            w.add_chat_template(v.chat_template)
        factors = rope_freq_factors(model)
        if factors is not None:
            w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
        for name, t in model.state_dict().items():
            if a.tie_word_embeddings and name == "output.weight":
                continue
            data = t.detach().float().cpu().numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms: F32, as llama.cpp writes them
                w.add_tensor(gguf_name(name), data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gguf_name(name), data.astype(np.float16))
            else:
                w.add_tensor(gguf_name(name), quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
