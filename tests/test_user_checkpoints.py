"""The paths users' own checkpoints take: values that differ from every loader's fallback (rope_theta 500000,
Llama 3.1 vs 3.2 rope factors), multi-shard and Llama 2 Meta files, and the 1B shape behind every 1B figure."""

import json

import pytest
import torch
from tiny_finetune import tiny_model, write_tiny_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import SHAPES, load_checkpoint, meta_args, save_meta
from llama.errors import UserError
from llama.model import RopeScaling, Transformer, rope_inv_freq

X = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64]])


def test_the_1b_shape_has_the_published_parameter_count_and_shapes():
    """--shape llama3.2-1b (built on the meta device: free) against meta-llama/Llama-3.2-1B's config.json."""
    with torch.device("meta"):
        model = Transformer(SHAPES["llama3.2-1b"])
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in params) == 1_235_814_400  # tied output: counted once
    assert model.output.weight is model.tok_embeddings.weight
    attn, mlp = model.layers[0].attention, model.layers[0].feed_forward
    assert (attn.wq.weight.shape, attn.wk.weight.shape, mlp.w1.weight.shape) == (
        (2048, 2048),
        (512, 2048),
        (8192, 2048),
    )
    assert model.args.rope_theta == 500000.0 and model.args.rope_scaling.factor == 32.0


def test_hugging_face_round_trip_keeps_rope_theta_500000_and_llama3_scaling(tmp_path):
    """rope_theta 500000 is neither our loader's fallback nor LlamaConfig's default (10000): a save or load that
    dropped it would change the logits, and this test would see it."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    model = tiny_model(seed=4, rope_theta=500000.0, rope_scaling=scaling, max_seq_len=64).eval()
    write_tiny_checkpoint(tmp_path, model=model)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    ours, _ = load_checkpoint(tmp_path, torch.float32, "cpu")
    assert ours.args.rope_theta == 500000.0 and ours.args.rope_scaling == scaling
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    positions = torch.arange(40)[None]  # past original_max_position_embeddings: the scaling matters
    tokens = (positions * 7 + 3) % 259
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
    default = LlamaConfig()  # the value a dropped field would fall back to
    assert getattr(default, "rope_theta", None) in (None, 10000.0)


def test_meta_params_json_rope_factor_llama_3_1_vs_3_2():
    base = dict(n_layers=2, n_heads=32, n_kv_heads=8, vocab_size=128256, rope_theta=500000.0, use_scaled_rope=True)
    assert meta_args({**base, "dim": 2048}).rope_scaling.factor == 32.0  # Llama 3.2 1B / 3B
    assert meta_args({**base, "dim": 4096}).rope_scaling.factor == 8.0  # Llama 3.1 8B
    assert meta_args({**base, "dim": 4096, "rope_scaling_factor": 16.0}).rope_scaling.factor == 16.0
    assert meta_args({k: v for k, v in base.items() if k != "use_scaled_rope"} | {"dim": 2048}).rope_scaling is None
    f8 = rope_inv_freq(meta_args({**base, "dim": 4096}))
    f32 = rope_inv_freq(meta_args({**base, "dim": 4096, "rope_scaling_factor": 32.0}))
    assert torch.equal(f8[:4], f32[:4]) and not torch.equal(f8[-4:], f32[-4:])  # low frequencies scaled differently


def test_meta_loader_refuses_shards_and_drops_llama2_rope_table(tmp_path):
    model = tiny_model(seed=5, vocab_size=128256).eval()  # no tokenizer.model: the Llama 3 tokenizer is used
    save_meta(model, tmp_path / "one")
    sd = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "rope.freqs": torch.randn(4)}, tmp_path / "one" / "consolidated.00.pth")
    loaded, _ = load_checkpoint(tmp_path / "one", torch.float32, "cpu")  # rope.freqs: ignored, recomputed
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X))
    (tmp_path / "one" / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(UserError, match="2 model-parallel shards"):
        load_checkpoint(tmp_path / "one", torch.float32, "cpu")


def test_a_tokenizer_bigger_than_the_embedding_is_refused_at_load(tmp_path, llama3_tokenizer_path):
    """A Meta folder whose tokenizer.model belongs to another model (Llama 3's 128,256 tokens for a 259-row
    embedding): one line at load, not an index error in the middle of a generation."""
    save_meta(tiny_model(), tmp_path, tokenizer_file=llama3_tokenizer_path)
    with pytest.raises(UserError, match="128,256 tokens but the model's embedding only 259 rows"):
        load_checkpoint(tmp_path, torch.float32, "cpu")
