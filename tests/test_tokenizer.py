"""llama/tokenizer.py against independent references: transformers' tokenizers for the default GGUF, the Llama 3
tokenizer.model (converted by transformers' TikTokenConverter, run by the `tokenizers` library) and a SentencePiece
model trained here; plus hand-known Llama 3 ids."""

from __future__ import annotations

import io
import random

import pytest
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from llama.checkpoint import DEFAULT_CKPT_DIR
from llama.tokenizer import Llama3Tokenizer, SentencePieceTokenizer, load_tokenizer_file

SAMPLES = [
    "Hello world! How are you today?",
    "I'm sure they'll say we've done it, didn't they? It's John's, you're right, I'd know.",
    "Numbers: 12345, 3.14, -0.001, 1e10, 2024-06-01, 1,000,000 and 007.",
    "Unicode: café, naïve, Straße, Ångström, ελληνικά, русский, עברית, العربية.",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji: 😀🚀👍🏽 👨‍👩‍👧‍👦 ❤️ and ✓ ✗ → ∞",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0:\n\t\tpass\n",
    "whitespace    runs  and\ttabs\t\tand\n\n\nnewlines   \n  \r\n trailing   ",
    "   leading spaces",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "MiXeD CaSe WORDS and ALLCAPS, camelCaseIdentifiers, snake_case_names.",
    "",
]
TEXT = "".join(SAMPLES)


# ---- the default model's byte-level BPE (from the GGUF) ------------------------------------------------------
@pytest.fixture(scope="module")
def default_tokenizers():
    """(ours, transformers') for the embedded GGUF."""
    from llama.gguf_file import read_gguf
    from llama.tokenizer import ByteBPETokenizer

    gguf = next(DEFAULT_CKPT_DIR.glob("*.gguf"))
    ours = ByteBPETokenizer.from_gguf_fields(read_gguf(gguf)[0])
    return ours, AutoTokenizer.from_pretrained(DEFAULT_CKPT_DIR, gguf_file=gguf.name)


def test_default_tokenizer_matches_transformers(default_tokenizers):
    ours, ref = default_tokenizers
    for s in SAMPLES + [TEXT]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == s == ref.decode(ids)
    assert ours.bos_id is None and ours.eos_id == ref.eos_token_id == 2
    assert ours.encode("hi", bos=True, eos=True) == ours.encode("hi") + [2]  # SmolLM2 uses no BOS


def test_default_chat_format_matches_the_checkpoint_template(default_tokenizers):
    """encode_dialog equals transformers rendering the GGUF's own Jinja chat template."""
    ours, ref = default_tokenizers
    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2 + 2 = ?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 × 3?"},
        ],
    ]
    for d in dialogs:
        expected = ref.apply_chat_template(d, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert ours.encode_dialog(d) == list(expected)
    assert 2 in ours.stop_ids


# ---- Llama 3 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    """(ours, reference): the reference is built by transformers from the same BPE ranks with its own copy of
    Meta's pattern and runs in the Rust `tokenizers` library, not tiktoken."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ours = Llama3Tokenizer(llama3_tokenizer_path)
    specials = sorted(ours.special_tokens, key=ours.special_tokens.get)
    ref = TikTokenConverter(vocab_file=str(llama3_tokenizer_path), extra_special_tokens=specials).converted()
    return ours, PreTrainedTokenizerFast(tokenizer_object=ref)


def test_llama3_ids_match_reference(llama3):
    ours, ref = llama3
    for s in SAMPLES + [TEXT]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == s
    # special-token text in user input is plain text, never a control token
    assert 128000 not in ours.encode("<|begin_of_text|>")


def test_llama3_special_ids_and_known_encoding(llama3):
    ours, _ = llama3
    assert ours.n_words == 128256
    assert (ours.bos_id, ours.eos_id, ours.eot_id) == (128000, 128001, 128009)
    assert ours.special_tokens["<|start_header_id|>"] == 128006 and ours.special_tokens["<|end_header_id|>"] == 128007
    assert ours.stop_ids == {128001, 128008, 128009}  # end_of_text, eom, eot
    assert ours.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert ours.decode([128000, 9906, 1917]) == "<|begin_of_text|>Hello world"


def test_llama3_chat_format(llama3):
    """Meta's layout: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> per
    message, ending with the assistant header; checked against the reference encoding that text with specials."""
    ours, ref = llama3
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " What is the capital of France? "},
    ]
    text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = ours.encode_dialog(dialog)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


# ---- SentencePiece ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 400-piece BPE SentencePiece model trained here on a generated corpus, saved as tokenizer.model."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog llama model token cache rotary attention".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 999)}." for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


SP_SAMPLES = ["the lazy llama 42 caches", "rotary attention over the quick dog 7.", "unseen words: café 😀 日本"]


def test_sentencepiece_matches_processor_and_transformers(sp_model):
    import sentencepiece as spm

    tok = load_tokenizer_file(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf = LlamaTokenizer.from_pretrained(sp_model.parent)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 400) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    for s in SP_SAMPLES:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids == [1] + sp.encode(s) + [2]
        assert ids[1:-1] == hf.encode(s, add_special_tokens=False)
        assert tok.decode(ids[1:-1]) == s
    # whitespace runs and newlines: SentencePiece normalises them (transformers' conversion differs here)
    assert tok.encode("a  b\nc") == sp.encode("a  b\nc")


def test_sentencepiece_llama2_chat_format(sp_model):
    tok = load_tokenizer_file(sp_model)
    dialog = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    expected = (
        [1]
        + tok.sp.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 ")
        + [2]
        + [1]
        + tok.sp.encode("[INST] Q2 [/INST]")
    )
    assert tok.encode_dialog(dialog) == expected


def test_load_tokenizer_file_detects_tiktoken(llama3_tokenizer_path):
    assert isinstance(load_tokenizer_file(llama3_tokenizer_path), Llama3Tokenizer)
