"""llama/export.py against the libraries that read its files: `tokenizers` and transformers' AutoTokenizer for
tokenizer.json, transformers' LlamaForCausalLM for the HF folder, gguf's reader, transformers' GGUF loader and
ours for the GGUF file. Device: CPU, fp32 throughout (F16/BF16/Q8_0 weights are compared after dequantising)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama.checkpoint import load_checkpoint
from llama.errors import UserError
from llama.export import bpe_vocab, save_gguf, save_hf_folder, save_tokenizer_files, tiktoken_merges, tokenizer_json
from llama.tokenizer import ByteBPETokenizer, load_tokenizer_file

TEXTS = [
    "Hello world! It's 2026-11-28, and pi is 3.14159.",
    "  leading spaces,\ttabs\nand new lines\n\n\nthree of them",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🦙 and ÅÄÖ.",
    "def f(x):\n    return x**2  # code, with    runs of spaces   ",
    "12345678901234567890 numbers 1,000,000 and 3.0e-5",
    "don't won't I'm you're they've we'll he'd",
]


@pytest.fixture(scope="module")
def smollm_tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def llama3_tokenizer(llama3_tokenizer_path):
    return load_tokenizer_file(llama3_tokenizer_path)


def test_tiktoken_merges_by_hand():
    """Ranks a=0 b=1 c=2 ab=3 bc=4 abc=5: abc splits as (a, bc) and (ab, c), ordered by the left part's rank."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert tiktoken_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")]


@pytest.mark.parametrize("which", ["smollm", "llama3"])
def test_tokenizer_json_encodes_like_ours(tmp_path, which, smollm_tokenizer, llama3_tokenizer):
    """The `tokenizers` library, our ByteBPETokenizer reading the same file, and AutoTokenizer all give the ids
    of the tokenizer it was written from (SmolLM2's GGUF vocabulary; Llama 3's 128k tiktoken ranks)."""
    ours = smollm_tokenizer if which == "smollm" else llama3_tokenizer
    save_tokenizer_files(ours, tmp_path)
    lib = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reread = ByteBPETokenizer.from_hf_files(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = ours.encode(text, bos=True)
        assert lib.encode(text).ids == expected, text
        assert reread.encode(text, bos=True) == expected, text
        assert auto(text)["input_ids"] == expected, text
        assert lib.decode(expected[1:] if ours.bos_id is not None else expected) == text
    assert reread.stop_ids == ours.stop_ids and reread.eos_id == ours.eos_id and reread.bos_id == ours.bos_id


def test_llama3_vocab_has_every_token_once(llama3_tokenizer):
    v = bpe_vocab(llama3_tokenizer)
    assert len(v.tokens) == 128256 and len(set(v.tokens)) == 128256
    assert v.tokens[128000] == "<|begin_of_text|>" and v.tokens[128009] == "<|eot_id|>"
    j = tokenizer_json(v)
    assert len(j["model"]["vocab"]) + len(j["added_tokens"]) == 128256


@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_loads_in_transformers(tmp_path, smollm_tokenizer, tied):
    """Llama 3 rope scaling and theta 500000 (neither is a default that could hide a dropped field)."""
    model = tiny_model(seed=5, vocab_size=smollm_tokenizer.n_words, rope_theta=500000.0, tie_word_embeddings=tied)
    save_hf_folder(model, smollm_tokenizer, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    ids = smollm_tokenizer.encode(TEXTS[0] + TEXTS[2], bos=True) * 3  # past the rope scaling's 64 positions
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(x).logits
        assert expected.abs().max() > 1
        assert (model(x) - expected).abs().max().item() <= 1e-4
    reloaded, tok = load_checkpoint(tmp_path, torch.float32, "cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert tok.encode(TEXTS[1]) == smollm_tokenizer.encode(TEXTS[1])


@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip(tmp_path, smollm_tokenizer, weight_type):
    """Our loader reads back exactly the weights the type stores (gguf's own rounding) and the same tokenizer;
    in f32, transformers' GGUF loader gives our logits and the original model's from the same file."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    model = tiny_model(seed=6, vocab_size=smollm_tokenizer.n_words, dim=64, rope_scaling=None)
    path = save_gguf(model, smollm_tokenizer, tmp_path / "m.gguf", weight_type)
    ours, tok = load_checkpoint(path, torch.float32, "cpu")
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[weight_type]
    for name, t in model.state_dict().items():  # what the type stores, dequantised by gguf itself
        x = t.numpy()
        if x.ndim == 2 and qtype != Q.F32:
            x = x.astype(np.float16).astype(np.float32) if qtype == Q.F16 else dequantize(quantize(x, qtype), qtype)
        assert np.array_equal(ours.state_dict()[name].numpy(), x.reshape(t.shape)), name
    assert tok.encode(TEXTS[4], bos=True) == smollm_tokenizer.encode(TEXTS[4], bos=True)
    assert tok.stop_ids == smollm_tokenizer.stop_ids and tok.default_system == smollm_tokenizer.default_system
    if weight_type != "f32":  # the other types' values are gguf's own (checked above); the file layout is one
        return
    x = torch.tensor([smollm_tokenizer.encode(TEXTS[0] + TEXTS[3], bos=True)])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(x).logits
        assert expected.abs().max() > 1
        assert (ours(x) - expected).abs().max().item() <= 1e-4
        assert (model(x) - expected).abs().max().item() <= 1e-4


def test_gguf_llama3_rope_and_tokenizer(tmp_path, llama3_tokenizer):
    """A Llama-3-shaped file: rope scaling travels as rope_freqs, the tokenizer as llama-bpe with ignore_merges;
    our loader gives the original logits and tiktoken's ids."""
    model = tiny_model(seed=7, vocab_size=llama3_tokenizer.n_words, dim=32, hidden_dim=48, rope_theta=500000.0)
    path = save_gguf(model, llama3_tokenizer, tmp_path / "llama3.gguf", "f32")
    ours, tok = load_checkpoint(path, torch.float32, "cpu")
    assert ours.args.rope_scaling is None and len(ours.args.rope_freq_factors) == model.args.head_dim // 2
    x = torch.tensor([llama3_tokenizer.encode(" ".join(TEXTS), bos=True)])
    assert x.shape[1] > 64  # past the scaling's original context, where the factors matter
    with torch.no_grad():
        assert (ours(x) - model(x)).abs().max().item() <= 1e-5
    for text in TEXTS:
        assert tok.encode(text, bos=True) == llama3_tokenizer.encode(text, bos=True), text
    assert tok.stop_ids == llama3_tokenizer.stop_ids


def test_gguf_refuses_unknown_type(tmp_path, smollm_tokenizer):
    with pytest.raises(UserError, match="GGUF weight type"):
        save_gguf(tiny_model(vocab_size=smollm_tokenizer.n_words), smollm_tokenizer, tmp_path / "m.gguf", "q4_k")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["smollm", "llama3"])
def test_gguf_runs_in_llama_cpp(tmp_path, which, smollm_tokenizer, llama3_tokenizer):
    """llama.cpp itself (through llama-cpp-python, where installed: it builds llama.cpp from source, so CI skips
    this) reads our GGUF: the same token ids, and logits within fp32 rounding of ours, with Llama 3 rope scaling
    past its original context in the llama3 case."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tok = smollm_tokenizer if which == "smollm" else llama3_tokenizer
    scaling = {} if which == "llama3" else {"rope_scaling": None}
    model = tiny_model(seed=8, vocab_size=tok.n_words, dim=64, rope_theta=500000.0, **scaling)
    path = save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    f32 = llama_cpp.GGML_TYPE_F32  # its KV cache defaults to f16, which would round every key and value
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False, type_k=f32, type_v=f32
    )
    text = " ".join(TEXTS)[:300]
    ids = tok.encode(text, bos=True)
    assert llm.tokenize(text.encode(), add_bos=tok.bos_id is not None, special=False) == ids
    ids = ids[:128]
    assert len(ids) > 64  # past TINY_ROPE's original context
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(want).max() > 1 and np.abs(got - want).max() <= 1e-3
