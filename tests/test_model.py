"""llama/model.py against independent references: transformers' LlamaForCausalLM, and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ROPE, randomize_, tiny_args, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import interleaved_to_rotate_half, load_checkpoint, save_hf
from llama.matmul import linear
from llama.model import (
    SHORT_SEQUENCE,
    ColumnBlocks,
    KVCache,
    Linear,
    ModelArgs,
    RMSNorm,
    RopeScaling,
    apply_rope,
    attend,
    attend_by_sums,
    fuse_projections,
    lower_materialize,
    rope_inv_freq,
    row_block,
)
from project.checkpointing import apply_checkpointing

# (name, ModelArgs overrides): GQA + Llama 3 scaling; tied embeddings without scaling (plain MHA);
# multi-query attention with both tied embeddings and scaling.
CONFIGS = [
    ("gqa_llama3_rope", dict()),
    ("tied_mha", dict(n_kv_heads=4, rope_scaling=None, tie_word_embeddings=True)),
    ("mqa_tied_llama3_rope", dict(n_kv_heads=1, tie_word_embeddings=True)),
]
SEQ_LEN = 100  # beyond TINY_ROPE.original_max_position_embeddings (64), so the scaling matters
LLAMA3_VOCAB = 128256  # a folder with the Llama 3 tokenizer.model must have its vocabulary (the loader checks)


def hf_config(a: ModelArgs) -> LlamaConfig:
    rope = None
    if a.rope_scaling is not None:
        s = a.rope_scaling
        rope = dict(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        rope_scaling=rope,
        tie_word_embeddings=a.tie_word_embeddings,
        attn_implementation="eager",
    )


def tokens(batch=2, seq=SEQ_LEN, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hf_checkpoint_logits_match_transformers(tmp_path, llama3_tokenizer_path, name, overrides):
    """An HF model with random weights, saved as safetensors (sharded), loaded through our HF loader."""
    a = tiny_args(vocab_size=LLAMA3_VOCAB, **overrides)
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(hf_config(a)), seed=1).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_ours(tmp_path, llama3_tokenizer_path)
    assert ours.args.tie_word_embeddings == a.tie_word_embeddings
    assert (ours.args.rope_scaling is None) == (a.rope_scaling is None)
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert expected.abs().max() > 1.0  # logits are far from zero, so 1e-4 is a real bound
    assert (got - expected).abs().max().item() <= 1e-4


def load_ours(path, tokenizer_path):
    """Our HF loader through the public entry point (a Llama 3 tokenizer.model makes the folder complete)."""
    (path / "tokenizer.model").symlink_to(tokenizer_path)
    model, _ = load_checkpoint(path, torch.float32, "cpu")
    return model


def test_without_qk_permutation_logits_differ(tmp_path, llama3_tokenizer_path):
    """The HF comparison can fail: skipping the rotate-half -> interleaved permutation is caught."""
    a = tiny_args(vocab_size=LLAMA3_VOCAB)
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(hf_config(a)), seed=1).eval()
    hf.save_pretrained(tmp_path)
    ours = load_ours(tmp_path, llama3_tokenizer_path)
    for layer in ours.layers:  # undo the permutation the loader applied
        att = layer.attention
        with torch.no_grad():
            att.wq.weight.copy_(interleaved_to_rotate_half(att.wq.weight, a.n_heads))
            att.wk.weight.copy_(interleaved_to_rotate_half(att.wk.weight, a.n_kv_heads))
    with torch.no_grad():
        assert (ours(tokens()) - hf(tokens()).logits).abs().max() > 1e-2


@pytest.mark.parametrize("name,overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_save_hf_loads_in_transformers(tmp_path, name, overrides):
    ours = tiny_model(seed=2, **overrides)
    save_hf(ours, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    x = tokens(seed=3)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_load_checkpoint_detects_hf_format(tmp_path, llama3_tokenizer_path):
    """Through the public entry point: config.json + safetensors + tokenizer.model."""
    ours = tiny_model(seed=4, vocab_size=128256, dim=32, hidden_dim=48)
    save_hf(ours, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    model, tok = load_checkpoint(tmp_path, torch.float32, "cpu")
    assert tok.bos_id == 128000
    x = tokens(vocab=128256)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))


# ---- ModelArgs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(dim=60, n_heads=8), "not divisible"),
        (dict(dim=24, n_heads=8), "must be even"),  # head dim 3
        (dict(n_heads=4, n_kv_heads=3), "not a multiple"),
        (dict(n_layers=0), "must be positive"),
        (dict(vocab_size=-1), "must be positive"),
    ],
)
def test_model_args_rejects_bad_configs(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_args(**kw)


def test_model_args_hidden_dim_from_meta_params():
    # Llama 3.2-1B: int(2 * 4 * 2048 / 3) = 5461; * 1.5 = 8191 (truncated); rounded up to 256 -> 8192.
    assert ModelArgs(dim=2048, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256).hidden_dim == 8192
    # Llama 3.1-8B: 10922 * 1.3 = 14198 -> multiple of 1024 -> 14336.
    assert ModelArgs(dim=4096, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024).hidden_dim == 14336
    a = ModelArgs.from_dict({"dim": 64, "n_heads": 4, "unknown_key": 1, "rope_scaling": {"factor": 8.0, "x": 0}})
    assert a.n_kv_heads == 4 and a.rope_scaling == RopeScaling(factor=8.0)


# ---- components against hand-worked values ---------------------------------------------------------------
# Each component has an autograd form and, without autograd, an in-place one (llama.model.eager_inference): both
# are held to the same hand-worked values.
BOTH_FORMS = pytest.mark.parametrize("autograd", [True, False], ids=["autograd", "in_place"])


@BOTH_FORMS
def test_rmsnorm_hand_worked(autograd):
    with torch.set_grad_enabled(autograd):
        norm = RMSNorm(2, eps=0.0)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([1.0, 2.0]))
        # rms([3, 4]) = sqrt((9 + 16) / 2) = sqrt(12.5)
        r = math.sqrt(12.5)
        out = norm(torch.tensor([[3.0, 4.0]]))
        torch.testing.assert_close(out, torch.tensor([[3 / r, 2 * 4 / r]]))
        # bf16 input: normalised in fp32, returned in bf16
        out16 = norm(torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16))
        torch.testing.assert_close(out16.float(), torch.tensor([[3 / r, 2 * 4 / r]]), atol=2e-2, rtol=0)


@BOTH_FORMS
def test_rope_rotates_interleaved_pairs_by_position_times_frequency(autograd):
    with torch.set_grad_enabled(autograd):
        # head dim 4, theta 10000: inverse frequencies 10000^(-0/4) = 1 and 10000^(-2/4) = 0.01
        a = ModelArgs(dim=4, n_layers=1, n_heads=1, vocab_size=8, hidden_dim=8, rope_theta=10000.0)
        torch.testing.assert_close(rope_inv_freq(a), torch.tensor([1.0, 0.01]))
        pos = 3
        angles = pos * rope_inv_freq(a)
        x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
        out = apply_rope(x, angles.cos().view(1, 1, 1, 2), angles.sin().view(1, 1, 1, 2)).flatten()
        c0, s0, c1, s1 = math.cos(3), math.sin(3), math.cos(0.03), math.sin(0.03)
        expected = [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1]
        torch.testing.assert_close(out, torch.tensor(expected))
        # a quarter turn takes (1, 0) to (0, 1)
        q = apply_rope(torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
        torch.testing.assert_close(q.flatten(), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_forms_compute_what_the_autograd_forms_do(dtype):
    """Without autograd, RMSNorm, SwiGLU and the residual sums work in place on their own temporaries and RoPE
    multiplies complex numbers: the same values as the autograd forms (RMSNorm bit for bit, RoPE within an fp32
    rounding before the result's own), and no input is overwritten."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    x0 = x.clone()
    with torch.no_grad():
        fast = norm(x)
    assert torch.equal(x, x0)
    assert torch.equal(fast, norm(x).detach())

    q = torch.randn(2, 5, 4, 16, generator=g).to(dtype)
    angles = torch.randn(2, 5, 1, 8, generator=g) * 10
    with torch.no_grad():
        fast = apply_rope(q, angles.cos(), angles.sin())
    ulp = 2e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(fast, apply_rope(q, angles.cos(), angles.sin()), atol=ulp * 10, rtol=ulp)

    model = fuse_projections(tiny_model(seed=3)).to(dtype)  # fused w13: the in-place SwiGLU
    ids = tokens(seq=12)
    emb0 = model.tok_embeddings.weight.clone()
    with torch.no_grad():
        fast = model(ids)
    assert torch.equal(model.tok_embeddings.weight, emb0)
    slow = model(ids).detach()
    scale = slow.abs().max().item()
    torch.testing.assert_close(fast, slow, atol=(1e-5 if dtype == torch.float32 else 3e-2) * scale, rtol=0)


def test_llama3_rope_scaling_hand_worked():
    """Head dim 16, theta 10000, factor 8, low 1, high 4, original context 64: cut-offs at wavelengths 16 and 64."""
    a = ModelArgs(dim=16, n_layers=1, n_heads=1, vocab_size=8, hidden_dim=8, rope_theta=10000.0, rope_scaling=TINY_ROPE)
    got = rope_inv_freq(a)
    # i=0: freq 1, wavelength 2*pi = 6.28 < 16: unchanged.
    assert got[0].item() == pytest.approx(1.0)
    # i=2: freq 10000^(-4/16) = 0.1, wavelength 62.83 in [16, 64]: smoothed with
    # s = (64 / 62.83 - 1) / (4 - 1) = 0.006197, freq (1 - s) * 0.1 / 8 + s * 0.1 = 0.013042.
    s = (64 / (2 * math.pi / 0.1) - 1) / 3
    assert s == pytest.approx(0.006197, abs=1e-6)
    assert got[2].item() == pytest.approx(0.013042, rel=1e-4)
    assert got[2].item() == pytest.approx((1 - s) * 0.1 / 8 + s * 0.1, rel=1e-6)
    # i=1: freq 10000^(-2/16) = 0.316228, wavelength 19.8692: s = (64 / 19.8692 - 1) / 3 = 0.740357,
    # freq (1 - 0.740357) * 0.316228 / 8 + 0.740357 * 0.316228 = 0.244385
    assert got[1].item() == pytest.approx(0.244385, rel=1e-5)
    # i=4: freq 0.01, wavelength 628 > 64: divided by the factor.
    assert got[4].item() == pytest.approx(0.01 / 8)
    # GGUF rope_freqs factors divide each frequency.
    b = ModelArgs(
        dim=4, n_layers=1, n_heads=1, vocab_size=8, hidden_dim=8, rope_theta=10000.0, rope_freq_factors=[2.0, 4.0]
    )
    torch.testing.assert_close(rope_inv_freq(b), torch.tensor([0.5, 0.0025]))


def test_kv_cache_sizing_and_lifecycle():
    model = tiny_model()
    a = model.args
    assert model.cache_nbytes() == 0
    model.setup_cache(3, 10)
    c = model.layers[0].attention.cache
    assert isinstance(c, KVCache) and c.k.shape == (3, a.n_kv_heads, 10, a.head_dim) == c.v.shape
    # per layer: keys + values, 3 rows x 2 kv heads x 10 positions x 16 dims x 4 bytes
    assert model.cache_nbytes() == a.n_layers * 2 * 3 * 2 * 10 * 16 * 4
    model.clear_cache()
    assert model.cache_nbytes() == 0 and all(l.attention.cache is None for l in model.layers)


def test_cached_chunks_equal_one_full_forward():
    """Prefill in chunks (several tokens at start_pos > 0) and token by token give the full forward's logits."""
    model = tiny_model()
    x = tokens(seq=40)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 40)
        parts = [model(x[:, :15], 0), model(x[:, 15:30], 15)] + [model(x[:, i : i + 1], i) for i in range(30, 40)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_attention_takes_sdpa_output_in_any_memory_order(monkeypatch):
    """SDPA's CUDA kernels return (B, H, T, hd) laid out as (B, T, H, hd); the decode path (one token, the GQA
    groups folded into the query length) must read it by shape, not by a view that assumes contiguity. The same
    prefill and token-by-token decode, with SDPA's output re-laid out that way, give the contiguous run's logits."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        model, x = tiny_model(seed=3), tokens(seq=12)
        with torch.no_grad():
            model.setup_cache(2, 12)
            return torch.cat([model(x[:, :8], 0)] + [model(x[:, i : i + 1], i) for i in range(8, 12)], dim=1)

    want = run()
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2),
    )
    torch.testing.assert_close(run(), want, atol=0, rtol=0)


def test_fused_projections_give_the_unfused_outputs():
    """wqkv / w13 hold the separate weights stacked: the same logits, prefill and cached decode, and 4 matmuls
    per block instead of 7. A LoRA-wrapped projection is refused (fusing would drop its adapter)."""
    model, fused = tiny_model(seed=3), fuse_projections(tiny_model(seed=3))
    assert_same_logits(fused, model, tol=1e-6)
    block = fused.layers[0]
    linears = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(linears) == ["attention.wo", "attention.wqkv", "feed_forward.w13", "feed_forward.w2"]
    a = model.args
    assert block.attention.wqkv.weight.shape == ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim)
    torch.testing.assert_close(block.feed_forward.w13.weight[a.hidden_dim :], model.layers[0].feed_forward.w3.weight)

    from project.model.lora import LoRAConfig, apply_lora

    with pytest.raises(ValueError, match="plain nn.Linear"):
        fuse_projections(apply_lora(tiny_model(), LoRAConfig()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_blocks_sum_their_blocks_products(dtype):
    """ColumnBlocks.split holds W's columns in contiguous blocks and joined() gives W back exactly; the output is
    sum_j x_j W_j^T against an fp64 reference: in fp32 within fp32 rounding, in bf16 within one bf16 rounding of each
    block's product (the layers' own) and one of the sum, i.e. 2^-8 of (sum_j |x_j W_j^T| + |y|)."""
    torch.manual_seed(0)
    layer = Linear(32, 6).to(dtype)
    blocks = ColumnBlocks.split(layer, 8)
    assert len(blocks.parts) == 4 and (blocks.in_features, blocks.out_features) == (32, 6)
    assert all(p.weight.is_contiguous() and p.weight.shape == (6, 8) for p in blocks.parts)
    storages = {p.weight.untyped_storage().data_ptr() for p in blocks.parts}
    assert len(storages) == 1  # one allocation for all blocks (see ColumnBlocks.split)
    assert torch.equal(blocks.parts[2].weight, layer.weight[:, 16:24])
    assert torch.equal(blocks.joined().weight, layer.weight)
    x = torch.randn(5, 32).to(dtype)
    with torch.no_grad():
        y = blocks(x)
    parts = [x[:, j : j + 8].double() @ layer.weight[:, j : j + 8].double().T for j in range(0, 32, 8)]
    want = sum(parts)
    assert y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-6)
    else:
        bound = 2**-8 * (sum(p.abs() for p in parts) + want.abs())
        assert ((y.double() - want).abs() <= bound).all()


def test_row_blocks_are_the_widest_divisor_between_an_eighth_and_half_the_long_row():
    assert row_block(8192) == 2048 and row_block(14336) == 2048  # Llama 3.2-1B / 3B, Llama 3.1-8B w2
    assert row_block(6000) == 2000 and row_block(96, 64) == 32 and row_block(72, 64) == 24
    assert row_block(97, 64) is None and row_block(8191) is None  # no divisor that wide: the rows stay whole
    model = fuse_projections(tiny_model(hidden_dim=97), long_row=64)
    assert isinstance(model.layers[0].feed_forward.w2, Linear)


def test_fused_projections_hold_long_rows_in_blocks_with_the_unfused_outputs():
    """A w2 with rows longer than long_row becomes ColumnBlocks: the unfused model's logits, prefill and cached
    decode (fp32; the blocks' sums are reassociated), from the same weights."""
    model, fused = tiny_model(seed=3), fuse_projections(tiny_model(seed=3), long_row=64)
    w2 = fused.layers[0].feed_forward.w2
    assert isinstance(w2, ColumnBlocks) and w2.block == 32 and len(w2.parts) == 3  # hidden 96
    assert torch.equal(w2.joined().weight, model.layers[0].feed_forward.w2.weight)
    assert isinstance(fuse_projections(tiny_model()).layers[0].feed_forward.w2, Linear)  # no long_row: whole
    assert_same_logits(fused, model, tol=1e-5)


def assert_same_logits(fused, model, tol: float):
    """fused and model give the same logits for a 20-token prefill and a cached decode step after it."""
    x = tokens(seq=20)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=tol, rtol=tol)
        for m in (model, fused):
            m.setup_cache(2, 21)
            m(x, 0)
        torch.testing.assert_close(fused(x[:, :1], 20), model(x[:, :1], 20), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_single_row_path_under_compile(dtype):
    """Compiled, a single row becomes a multiply and a sum along the weight's rows (no matmul in the graph) and
    several rows stay F.linear; both agree with an fp64 reference within the error bound of fp32 sums (each
    term off by at most K fp32 roundings of the sum of |x w|) plus one rounding of the result to dtype."""
    torch.manual_seed(0)
    layer = Linear(320, 96).to(dtype)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    run = torch.compile(layer, backend=capture, dynamic=False, fullgraph=True)
    for rows in (1, 3):
        x = torch.randn(1, rows, 320).to(dtype)
        with torch.no_grad():
            got = run(x).double()
        ref = x.double() @ layer.weight.double().T
        magnitude = x.double().abs() @ layer.weight.double().abs().T
        bound = 320 * 2**-24 * magnitude + (2**-8 if dtype == torch.bfloat16 else 2**-24) * ref.abs()
        assert ((got - ref).abs() <= bound + 1e-12).all()
    single, several = graphs
    assert "aten.mm.default" not in str(single) and not any("linear" in t for t in single)
    assert any("sum" in t for t in single) and "efficient_llama.materialize" in single
    assert torch.equal(torch.ops.efficient_llama.materialize(x), x)
    assert any("linear" in t for t in several)
    torch.testing.assert_close(layer(x), linear(x, layer.weight), atol=0, rtol=0)  # eager: llama.matmul's


@pytest.mark.parametrize("T", [20, SHORT_SEQUENCE + 8])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_is_grouped_causal_attention_with_its_gradients(T, masked):
    """attend (SDPA's math backend up to SHORT_SEQUENCE queries on CPU, its flash kernel above) against softmax
    attention worked in fp64 with each key head repeated for its query heads: outputs and the gradients of q, k, v
    (fp32, within 1e-4), for plain causal attention and under a padding mask."""
    torch.manual_seed(0)
    B, H, K, d = 2, 4, 2, 16
    q, k, v = (torch.randn(B, n, T, d, requires_grad=True) for n in (H, K, K))
    allowed = torch.ones(T, T).tril().bool().expand(B, 1, T, T).clone()
    if masked:
        allowed[1, :, :, :3] = False  # row 1 left-padded by 3 keys
        allowed[1, :, :3, :] = torch.eye(3, T, dtype=torch.bool)  # each padding query sees itself only
    out = attend(q, k, v, allowed if masked else None)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = qd @ kd.repeat_interleave(H // K, 1).transpose(-1, -2) / math.sqrt(d)
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vd.repeat_interleave(H // K, 1)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_inductor_computes_materialized_rows_itself():
    """With lower_materialize registered, inductor's code for a compiled single-row product computes the normed row
    into a buffer itself and never calls efficient_llama::materialize (which without the lowering it calls once per
    product); the result is the eager one, an RMSNorm then the row times each weight row, within fp32 rounding."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    norm, layer = RMSNorm(64), Linear(64, 48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)

    def both(x):
        return layer(norm(x)), layer(F.silu(x))

    lower_materialize()
    torch._dynamo.reset()
    x = torch.randn(1, 1, 64)
    # Inductor's on-disk cache does not key on registered lowerings: a graph cached before would still call the op.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        got, (code,) = run_and_get_code(torch.compile(both, backend="inductor", dynamic=False, fullgraph=True), x)
        want = (norm(x).double() @ layer.weight.double().T, F.silu(x).double() @ layer.weight.double().T)
    assert "efficient_llama" not in code
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_by_sums_is_masked_softmax_attention(dtype):
    """attend_by_sums (the compiled CPU decode step's attention) against softmax(q k^T / sqrt(d)) v worked in fp64,
    with each row's masked keys left out of the softmax by hand; equal to SDPA too. bf16: the inputs are the same
    bf16 values, the result rounded once to bf16 (relative 2^-8) beyond fp32's rounding."""
    torch.manual_seed(0)
    B, K, G, S, d = 2, 3, 2, 10, 16
    q, k, v = torch.randn(B, K, G, d).to(dtype), torch.randn(B, K, S, d).to(dtype), torch.randn(B, K, S, d).to(dtype)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 7:] = False  # keys after the position
    mask[1, ..., :3] = False  # left padding
    ref = torch.zeros(B, K, G, d, dtype=torch.float64)
    for b in range(B):
        keep = mask[b, 0, 0]
        scores = q[b].double() @ k[b][:, keep].double().transpose(-1, -2) / math.sqrt(d)  # (K, G, kept)
        ref[b] = scores.softmax(-1) @ v[b][:, keep].double()
    got = attend_by_sums(q, k, v, mask)
    assert got.dtype == dtype and got.shape == (B, K, G, d)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(got.float(), sdpa, atol=tol, rtol=tol)


def test_static_step_equals_the_cached_decode():
    """Transformer.step (the whole cache read, keys masked by position and padding) gives forward's logits for
    the same token, position and left padding."""
    model = tiny_model(seed=4)
    x, pad_lens = tokens(seq=12), torch.tensor([0, 5])
    with torch.no_grad():
        model.setup_cache(2, 32)
        model(x, 0, pad_lens)
        want = model(x[:, -1:], 12, pad_lens, last_only=True)  # writes position 12, like step does
        got = model.step(x[:, -1:], torch.tensor([12]), pad_lens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        model.setup_cache(2, 32)
        model(x, 0)
        torch.testing.assert_close(
            model.step(x[:, -1:], torch.tensor([12])), model(x[:, -1:], 12, last_only=True), atol=1e-5, rtol=1e-5
        )


def test_last_only_returns_last_position():
    model = tiny_model()
    x = tokens(seq=12)
    with torch.no_grad():
        torch.testing.assert_close(model(x, last_only=True), model(x)[:, -1:])


def test_training_forward_backward_and_activation_checkpointing():
    """The same model trains: plain causal forward with autograd; checkpointed blocks give the same gradients."""
    model = tiny_model().train()
    x = tokens(seq=20)

    def grads():
        model.zero_grad()
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert all(g.abs().sum() > 0 for g in plain.values())
    apply_checkpointing(model, "all")  # project/checkpointing.py wraps blocks; the model knows nothing of it
    for n, g in grads().items():
        torch.testing.assert_close(g, plain[n])
