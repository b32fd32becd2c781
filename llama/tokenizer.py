"""Tokenizers behind one interface, each with its model family's chat format.

- `Llama3Tokenizer`: tiktoken BPE file `tokenizer.model` + the 256 Llama 3 special tokens; Llama 3 chat format.
- `ByteBPETokenizer`: GPT-2 style byte-level BPE whose vocabulary and merges come inside a GGUF file
  (the embedded SmolLM2 default); ChatML chat format.
- `SentencePieceTokenizer`: a SentencePiece `tokenizer.model` (Llama 2 family); Llama 2 chat format.

Every tokenizer has `bos_id` (None when the model uses no BOS), `eos_id`, `pad_id`, `stop_ids` (every
token that ends a reply), `n_words`, `encode(s, bos, eos)`, `decode(ids)` and `encode_dialog(messages)`,
which returns the prompt ids that end where the assistant's reply begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class Llama3Tokenizer:
    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
    num_reserved_special_tokens = 256
    # tiktoken panics on very long runs without whitespace; encode splits text into safe pieces.
    max_encode_chars = 400_000
    max_run_chars = 25_000

    def __init__(self, model_path: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(model_path))
        self.model_path = Path(model_path)
        self.mergeable_ranks = ranks  # token bytes -> rank (= id); llama/export.py writes tokenizer.json from it
        names = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|step_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|image|>",
        ]
        names += [f"<|reserved_special_token_{2 + i}|>" for i in range(self.num_reserved_special_tokens - len(names))]
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=Path(model_path).name, pat_str=self.pat_str, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = len(ranks) + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, self.eot_id, self.special_tokens["<|eom_id|>"]}

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), self.max_encode_chars):
            for piece in _split_long_runs(s[i : i + self.max_encode_chars], self.max_run_chars):
                ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """<|begin_of_text|> then per message a role header, the content and <|eot_id|>; then the assistant header."""
        ids = [self.bos_id]
        for m in messages:
            ids += self._header(m["role"]) + self.encode(m["content"].strip()) + [self.eot_id]
        return ids + self._header("assistant")

    def _header(self, role: str) -> list[int]:
        st = self.special_tokens
        return [st["<|start_header_id|>"]] + self.encode(role) + [st["<|end_header_id|>"]] + self.encode("\n\n")


def _split_long_runs(s: str, limit: int):
    """Yield pieces of s in which no run of only-whitespace or only-non-whitespace exceeds limit."""
    start, run, prev_space = 0, 0, None
    for i, ch in enumerate(s):
        space = ch.isspace()
        run = run + 1 if space == prev_space else 1
        prev_space = space
        if run > limit:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ByteBPETokenizer:
    """Byte-level BPE (GPT-2 family), exact merge-rank algorithm, as used by SmolLM2 and similar models.

    Pre-tokenisation follows the checkpoint's declared pre-tokeniser: digits split one by one (SmolLM),
    then the GPT-2 regex.
    """

    gpt2_pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    # llama.cpp's names for pre-tokenisers: these split digits one by one before the GPT-2 regex.
    split_digits_pre = {"smollm", "starcoder", "refact", "command-r", "smaug-bpe"}

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        special_ids: set[int],
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        stop_ids: set[int] | None = None,
        pattern: str = gpt2_pattern,
        split_digits: bool = False,
        chat_template: str | None = None,
        ignore_merges: bool = False,
    ):
        import regex

        self.tokens = tokens
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.merge_ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.special_ids = set(special_ids)
        self.n_words = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.stop_ids = set(stop_ids or ()) | {eos_id}
        self._digits = regex.compile(r"(\p{N})") if split_digits else None
        self._words = regex.compile(pattern)
        self._b2u = _byte_to_unicode()
        self._u2b = {c: b for b, c in self._b2u.items()}
        self.chat_template = chat_template
        self.ignore_merges = ignore_merges  # a word that is a whole token is that token (Llama 3 / tiktoken's rule)
        self.default_system = _chatml_default_system(chat_template)
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_gguf_fields(cls, meta: dict) -> ByteBPETokenizer:
        """Build from GGUF `tokenizer.ggml.*` metadata (already decoded to Python values)."""
        types = meta.get("tokenizer.ggml.token_type") or []
        special = {i for i, t in enumerate(types) if t in (3, 4)}  # CONTROL, USER_DEFINED
        stops = {meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta}
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        return cls(
            tokens=meta["tokenizer.ggml.tokens"],
            merges=meta.get("tokenizer.ggml.merges", []),  # absent or empty: no merges
            special_ids=special,
            bos_id=meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None,
            eos_id=meta["tokenizer.ggml.eos_token_id"],
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            stop_ids=stops,
            pattern=Llama3Tokenizer.pat_str if pre == "llama-bpe" else cls.gpt2_pattern,
            split_digits=pre in cls.split_digits_pre,
            chat_template=meta.get("tokenizer.chat_template"),
            ignore_merges=pre == "llama-bpe",  # llama.cpp's rule for this pre-tokeniser
        )

    @classmethod
    def from_hf_files(cls, folder: Path) -> ByteBPETokenizer:
        """Build from a Hugging Face `tokenizer.json` (byte-level BPE) and `tokenizer_config.json`."""
        import json

        tj = json.loads((Path(folder) / "tokenizer.json").read_text())
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        vocab = dict(tj["model"]["vocab"])
        for added in tj.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        pres = tj.get("pre_tokenizer") or {}
        pres = pres.get("pretokenizers", [pres])
        pattern, split_digits = cls.gpt2_pattern, False
        for p in pres:
            if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
                pattern = p["pattern"]["Regex"]
            elif p.get("type") == "Digits":
                split_digits = True

        def token_id(key):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return vocab.get(tok) if tok is not None else None

        gen_path = Path(folder) / "generation_config.json"
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
        eos = token_id("eos_token")
        stops = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return cls(
            tokens=tokens,
            merges=merges,
            special_ids={a["id"] for a in tj.get("added_tokens", []) if a.get("special")},
            bos_id=token_id("bos_token") if cfg.get("add_bos_token", False) else None,
            eos_id=eos if eos is not None else min(stops),
            pad_id=token_id("pad_token"),
            stop_ids=stops,
            pattern=pattern,
            split_digits=split_digits,
            chat_template=cfg.get("chat_template"),
            ignore_merges=tj["model"].get("ignore_merges", False),
        )

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        if self.ignore_merges and word in self.token_to_id:
            return (self.token_to_id[word],)
        symbols = list(word)
        while len(symbols) > 1:
            pairs = [(self.merge_ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, at = min(pairs)
            if rank == float("inf"):
                break
            first, second = symbols[at], symbols[at + 1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.token_to_id[s] for s in symbols)

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        chunks = self._digits.split(s) if self._digits else [s]
        for chunk in chunks:
            for word in self._words.findall(chunk):
                ids.extend(self._bpe("".join(self._b2u[b] for b in word.encode("utf-8"))))
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            tok = self.tokens[i]
            if i in self.special_ids:
                out += tok.encode("utf-8")
            else:
                out += bytes(self._u2b[c] for c in tok)
        return out.decode("utf-8", errors="replace")

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message, then <|im_start|>assistant\\n."""
        start, end = self.token_to_id["<|im_start|>"], self.token_to_id["<|im_end|>"]
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        ids = []
        for m in messages:
            ids += [start] + self.encode(f"{m['role']}\n{m['content']}") + [end] + self.encode("\n")
        return ids + [start] + self.encode("assistant\n")


def _chatml_default_system(template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the dialog has none (SmolLM2 has one)."""
    import re

    if not template:
        return None
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    return m.group(1) if m else None


class SentencePieceTokenizer:
    """A SentencePiece model (Llama 2 family) with the Llama 2 chat format."""

    def __init__(self, model_path: str | Path):
        from sentencepiece import SentencePieceProcessor

        self.model_path = Path(model_path)
        self.sp = SentencePieceProcessor(model_file=str(model_path))
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = {self.eos_id}

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(s) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """[INST] <<SYS>>system<</SYS>> user [/INST] assistant </s><s>[INST] ..."""
        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            system, *messages = messages
            messages[0] = {
                "role": "user",
                "content": f"<<SYS>>\n{system['content']}\n<</SYS>>\n\n{messages[0]['content']}",
            }
        ids = []
        for user, answer in zip(messages[::2], messages[1::2]):
            ids += self.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", True, True)
        return ids + self.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]", bos=True)


def load_tokenizer_file(path: str | Path):
    """A `tokenizer.model` file: tiktoken BPE (Llama 3: base64 token + rank per line) or SentencePiece."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.readline()
    parts = head.split()
    if len(parts) == 2 and parts[1].isdigit():
        return Llama3Tokenizer(path)
    return SentencePieceTokenizer(path)
