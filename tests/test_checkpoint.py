"""llama/checkpoint.py: Meta round trips, real Meta-style params.json, GGUF against transformers' GGUF loader
(the embedded default and a tiny file with every supported tensor type), and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_args, tiny_model
from transformers import AutoModelForCausalLM

from llama.checkpoint import DEFAULT_CKPT_DIR, atomic_write, load_checkpoint, save_meta
from llama.errors import UserError
from llama.model import RopeScaling, Transformer

X = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(0))


# ---- Meta format ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_save_meta_round_trip(tmp_path, llama3_tokenizer_path, tied):
    model = tiny_model(seed=7, tie_word_embeddings=tied, vocab_size=128256)  # the tokenizer's vocabulary
    save_meta(model, tmp_path, tokenizer_file=llama3_tokenizer_path)
    assert {p.name for p in tmp_path.iterdir()} == {"consolidated.00.pth", "params.json", "tokenizer.model"}
    loaded, tok = load_checkpoint(tmp_path, torch.float32, "cpu")
    assert loaded.args == model.args and tok.eot_id == 128009
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    # bf16 at load time: every weight converted, logits close
    half, _ = load_checkpoint(tmp_path, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        assert (half(X).float() - model(X)).abs().max() < 0.1 * model(X).abs().max()


@pytest.mark.parametrize("tied", [False, True])
def test_meta_style_params_json_loads_strict(tmp_path, tied):
    """A params.json as Meta ships it (no hidden_dim, use_scaled_rope) with a consolidated.00.pth that
    includes output.weight (equal to the embeddings when the model ties them, as Llama 3.2-1B does)."""
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 128256,  # the Llama 3 tokenizer's, which loads by default
        "multiple_of": 32,
        "ffn_dim_multiplier": 1.5,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    # hidden: int(2 * 256 / 3) = 170; * 1.5 = 255; rounded up to a multiple of 32 -> 256.
    # use_scaled_rope without a factor: Llama 3.2's small models use 32 (original context 8192).
    args = tiny_args(
        dim=64,
        vocab_size=128256,
        hidden_dim=256,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        max_seq_len=131072,
        tie_word_embeddings=tied,
    )
    model = randomize_(Transformer(args), seed=8).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "output.weight" in sd
    torch.save(sd, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded, tok = load_checkpoint(tmp_path, torch.float32, "cpu")  # Llama 3 tokenizer by default
    assert loaded.args.hidden_dim == 256 and loaded.args.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert loaded.args.tie_word_embeddings == tied
    assert tok.bos_id == 128000
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_shapes_that_do_not_match_the_config_are_a_user_error(tmp_path):
    save_meta(tiny_model(), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": 128}))
    with pytest.raises(UserError, match="does not match the weights"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_missing_or_unknown_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope", torch.float32, "cpu")
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_checkpoint(tmp_path, torch.float32, "cpu")
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(UserError, match="no consolidated.00.pth"):
        load_checkpoint(tmp_path, torch.float32, "cpu")
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path, torch.float32, "cpu")


# ---- GGUF: the embedded default against transformers ----------------------------------------------------------
def test_default_gguf_logits_match_transformers(default_model):
    model, tok = default_model
    gguf = next(DEFAULT_CKPT_DIR.glob("*.gguf"))
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_CKPT_DIR, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompts = [
        tok.encode_dialog([{"role": "user", "content": "What is the capital of France?"}]),
        tok.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))"),
        tok.encode("Les chats dorment 16 heures par jour. 猫は一日中寝ています。"),
    ]
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            expected = hf(x).logits
            got = model(x)
            assert expected.abs().max() > 5
            assert (got - expected).abs().max().item() <= 5e-4
            assert got[0, -1].argmax() == expected[0, -1].argmax()


# ---- GGUF: every tensor type the loader promises ------------------------------------------------------------
def _kquant_bytes(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (gguf cannot quantise to them) with sane fp16 scales."""
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype.name == "Q4_K":  # d, dmin (fp16) come first
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d (fp16) comes last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(path, model: Transformer, types: dict[str, str]):
    """Write `model` as a llama GGUF (Meta row order, as llama.cpp stores q/k), each tensor in the given type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import dequantize, quantize

    a = model.args
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_rope_dimension_count(a.head_dim)
    w.add_vocab_size(a.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    byte_chars = [chr(b) if 33 <= b <= 126 else chr(256 + b) for b in range(a.vocab_size - 2)]
    w.add_token_list(byte_chars + ["<|im_start|>", "<|im_end|>"])
    w.add_token_types([1] * (a.vocab_size - 2) + [3, 3])
    w.add_token_merges([])
    w.add_eos_token_id(a.vocab_size - 1)
    names = {
        "tok_embeddings": "token_embd",
        "norm": "output_norm",
        "output": "output",
        "attention.wq": "attn_q",
        "attention.wk": "attn_k",
        "attention.wv": "attn_v",
        "attention.wo": "attn_output",
        "feed_forward.w1": "ffn_gate",
        "feed_forward.w2": "ffn_down",
        "feed_forward.w3": "ffn_up",
        "attention_norm": "attn_norm",
        "ffn_norm": "ffn_norm",
    }
    rng = np.random.default_rng(0)
    stored = {}  # what the file holds, dequantised: the reference weights
    for name, t in model.state_dict().items():
        if a.tie_word_embeddings and name == "output.weight":
            continue
        parts = name.split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{names['.'.join(parts[2:-1])]}.weight"
        else:
            gname = f"{names[parts[0]]}.weight"
        qtype = Q[types.get(gname, "F32")]
        x = t.numpy()
        if qtype == Q.F32:
            data = x
        elif qtype == Q.F16:
            data = x.astype(np.float16)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            data = _kquant_bytes(qtype, *x.shape, rng)
        else:
            data = quantize(x, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stored[name] = torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32)).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


GGUF_TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "BF16",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.0.attn_output.weight": "Q4_K",
    "blk.0.ffn_gate.weight": "Q6_K",
    "blk.0.ffn_down.weight": "F16",
    "blk.0.ffn_up.weight": "Q4_K",
    "blk.1.attn_q.weight": "Q6_K",
    "blk.1.attn_k.weight": "Q4_K",
    "blk.1.attn_v.weight": "F16",
    "blk.1.attn_output.weight": "Q4_0",
    "blk.1.ffn_gate.weight": "Q4_1",
    "blk.1.ffn_down.weight": "BF16",
    "blk.1.ffn_up.weight": "Q6_K",
}


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_tensor_types_match_transformers(tmp_path, tied):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K: our loader and transformers' give the same logits."""
    # K-quants need rows of 256 values; head dim 64.
    model = tiny_model(seed=9, dim=256, hidden_dim=256, rope_scaling=None, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    stored = write_tiny_gguf(path, model, GGUF_TYPES)
    ours, tok = load_checkpoint(path, torch.float32, "cpu")
    assert ours.args.tie_word_embeddings == tied and tok.eos_id == 255
    for name, t in ours.state_dict().items():  # the right tensor in the right place, dequantised
        assert torch.equal(t, stored["tok_embeddings.weight" if tied and name == "output.weight" else name]), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(X).logits
        assert expected.abs().max() > 1
        # fp32 both ways, summed in other orders (ours may multiply through oneDNN: llama/matmul.py): within 1e-4
        # of the logits' scale, where a misplaced or misdecoded tensor moves them by O(1)
        assert (ours(X) - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_read_gguf_matches_gguf_reader(tmp_path):
    """Our fast GGUF parser against gguf's GGUFReader: same metadata values, same tensors after dequantising."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from llama.gguf_file import read_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model(seed=9, dim=256, hidden_dim=256, rope_scaling=None), GGUF_TYPES)
    meta, tensors = read_gguf(path)
    reader = GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta == expected and len(meta) > 10
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, ref in zip(tensors, reader.tensors):
        assert ours.qtype == ref.tensor_type
        assert np.array_equal(dequantize(ours.data, ours.qtype), dequantize(ref.data, ref.tensor_type)), ours.name
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match="cannot read GGUF"):
        load_checkpoint(tmp_path / "bad.gguf", torch.float32, "cpu")
    whole = path.read_bytes()
    for keep in (len(whole) - 1, len(whole) // 2, 200):  # cut in the last tensor, mid-way, in the header
        (tmp_path / "cut.gguf").write_bytes(whole[:keep])
        with pytest.raises(UserError, match="cannot read GGUF file .*cut.gguf"):
            load_checkpoint(tmp_path / "cut.gguf", torch.float32, "cpu")
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="the file is truncated: tensor "):
        load_checkpoint(tmp_path / "cut.gguf", torch.float32, "cpu")


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    atomic_write(path, lambda f: f.write(b"third"))
    assert path.read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    umask = os.umask(0o022)
    try:
        atomic_write(path, "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    finally:
        os.umask(umask)
    with pytest.raises(ZeroDivisionError):  # a failed write leaves the old file and no temporary behind
        atomic_write(path, lambda f: 1 / 0)
    assert path.read_text() == "x" and len(list(tmp_path.iterdir())) == 1
