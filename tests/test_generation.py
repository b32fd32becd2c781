"""llama/generation.py: the KV cache changes nothing but speed, batching changes nothing per row, sampling is
reproducible and reduces to greedy where it should, stop tokens end rows, and the cache is used as designed."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyTokenizer, tiny_model
from transformers import LlamaForCausalLM

from llama.checkpoint import ModelSource, save_hf
from llama.errors import UserError
from llama.generation import Llama, decode_one_token, prefill, sample
from llama.model import ColumnBlocks, KVCache, fuse_projections

PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 8, 1], [200, 13], [9, 9, 31, 64, 77]]
GEN = 24


@pytest.fixture(scope="module")
def tiny_llama():
    return Llama(tiny_model(seed=5), ToyTokenizer(), torch.device("cpu"))


def greedy(llama, prompts, use_kv_cache, n=GEN, **kw):
    return llama.generate(prompts, n, use_kv_cache=use_kv_cache, **kw).tokens


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_matches_transformers_generate(tmp_path, tiny_llama, use_kv_cache):
    """Independent reference: transformers' greedy generate on the same weights (saved by save_hf)."""
    save_hf(tiny_llama.model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for p in PROMPTS:
        ref = hf.generate(
            torch.tensor([p]),
            max_new_tokens=GEN,
            do_sample=False,
            min_new_tokens=GEN,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(p) :].tolist()
        assert greedy(tiny_llama, [p], use_kv_cache) == [ref]


def test_greedy_cache_on_off_and_batch_rows_identical(tiny_llama):
    singles = [greedy(tiny_llama, [p], True)[0] for p in PROMPTS]
    assert all(len(s) == GEN for s in singles)
    assert len({t for s in singles for t in s}) > 10  # the random model does not just repeat one token
    assert [greedy(tiny_llama, [p], False)[0] for p in PROMPTS] == singles
    assert greedy(tiny_llama, PROMPTS, True) == singles  # unequal lengths: left padding must not leak
    assert greedy(tiny_llama, PROMPTS, False) == singles


def test_compiled_decode_token_identical_to_the_plain_path(tiny_llama):
    """Llama(compile=True) decodes with torch.compile(Transformer.step): the same greedy tokens as the plain path,
    for single prompts and a left-padded batch, and one compiled graph serves calls of other lengths (the cache is
    rounded up to CACHE_BLOCK); calls alternating between batch sizes and padding each get their own graph."""
    import torch._dynamo

    singles = [greedy(tiny_llama, [p], True)[0] for p in PROMPTS]
    torch._dynamo.reset()
    compiled = Llama(fuse_projections(tiny_model(seed=5)), ToyTokenizer(), torch.device("cpu"), compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert greedy(compiled, PROMPTS, True) == singles
        assert greedy(compiled, PROMPTS, True, n=7) == [s[:7] for s in singles]  # same shapes: no recompilation
    assert greedy(compiled, PROMPTS, False) == singles  # without the cache: the plain path
    # Steps after a call's first skip torch.compile's guards: each call must still find its own batch's graph.
    for prompts in ([PROMPTS[1]], PROMPTS, [PROMPTS[0]], PROMPTS[:2]):
        assert greedy(compiled, prompts, True) == [singles[PROMPTS.index(p)] for p in prompts]


def test_compiled_decode_with_column_blocks_is_token_identical_to_the_plain_path(tiny_llama):
    """A w2 held in column blocks (fuse_projections' long rows, llama.model.ColumnBlocks) decodes the unsplit
    model's greedy tokens, compiled (each block a single-row product of its own) and plain (fp32)."""
    import torch._dynamo

    singles = [greedy(tiny_llama, [p], True)[0] for p in PROMPTS]
    torch._dynamo.reset()
    compiled = Llama(
        fuse_projections(tiny_model(seed=5), long_row=64), ToyTokenizer(), torch.device("cpu"), compile=True
    )
    assert greedy(compiled, PROMPTS, True) == singles
    assert greedy(compiled, PROMPTS, False) == singles


def test_compiled_step_uses_weights_changed_after_its_compilation():
    """The CPU step is compiled with its weights frozen in as constants: they are the model's own tensors, so a
    weight changed in place or replaced by a new tensor after compilation is what the next compiled call uses (its
    greedy tokens are the plain path's on the changed model, and differ from the unchanged model's)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = fuse_projections(tiny_model(seed=5))
    compiled = Llama(model, ToyTokenizer(), torch.device("cpu"), compile=True)
    before = greedy(compiled, PROMPTS, True)
    with torch.no_grad():
        model.layers[0].feed_forward.w13.weight.mul_(-2)
        model.layers[1].attention.wqkv.weight = torch.nn.Parameter(model.layers[1].attention.wqkv.weight.flip(0))
    after = greedy(compiled, PROMPTS, True)
    assert after == greedy(Llama(model, ToyTokenizer(), torch.device("cpu")), PROMPTS, True) and after != before


def test_build_holds_long_rows_in_blocks_only_for_a_compiled_cpu_step(monkeypatch):
    """Llama.build splits a w2 longer than LONG_ROW (here lowered below the default model's 1536 columns) only when
    the decode step will be compiled: eager calls on blocks would sum several rounded products instead of one."""
    import llama.generation

    monkeypatch.setattr(llama.generation, "LONG_ROW", 1024)
    compiled, eager = Llama.build(compile=True), Llama.build()
    w2 = compiled.model.layers[0].feed_forward.w2
    assert isinstance(w2, ColumnBlocks) and w2.block == 512 and len(w2.parts) == 3
    assert not any(isinstance(m, ColumnBlocks) for m in eager.model.modules())


def test_compiled_decode_with_w8a8_layers_matches_eager():
    """w8a8's CPU kernel takes a TorchScript object, which torch.compile cannot trace: the compiled step reaches it
    through project.quant's operator, and must give the eager path's tokens."""
    import torch._dynamo

    from project.quant import QuantConfig, quantize

    def build(compile):
        model = fuse_projections(tiny_model(seed=5))
        quantize(model, QuantConfig("w8a8"))
        return Llama(model, ToyTokenizer(), torch.device("cpu"), compile=compile)

    eager = [greedy(build(False), [p], True)[0] for p in PROMPTS]
    torch._dynamo.reset()
    assert greedy(build(True), PROMPTS, True) == eager


def test_compile_mode_reaches_torch_compile_and_a_wrong_one_stops_before_loading(monkeypatch):
    """--compile_mode is torch.compile's mode for the decode step (on CPU as the mode's inductor options, with the
    C++ wrapper); an unknown one is one UserError naming the choices, raised before any weights are read (the
    checkpoint folder here does not exist)."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    Llama(tiny_model(), ToyTokenizer(), torch.device("cpu"), compile=True, compile_mode="max-autotune-no-cudagraphs")
    options = dict(max_autotune=True, coordinate_descent_tuning=True, cpp_wrapper=True, freezing=True)
    assert seen == dict(fullgraph=True, dynamic=False, options=options)
    seen.clear()
    Llama(tiny_model(), ToyTokenizer(), torch.device("meta"), compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert seen == dict(fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")  # other devices: the mode
    with pytest.raises(UserError, match="--compile_mode must be one of default, max-autotune-no-cudagraphs"):
        Llama.build(ModelSource("/nonexistent/checkpoint"), compile=True, compile_mode="fastest")


def test_greedy_default_model_cache_on_off_and_batch(default_model):
    model, tok = default_model
    llama = Llama(model, tok, torch.device("cpu"))
    prompts = [  # short prompts of different lengths keep the cache-off runs cheap
        tok.encode_dialog(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
        ),
        tok.encode("def fibonacci(n):"),
    ]
    singles = [greedy(llama, [p], True, n=8, stop_at_eos=False)[0] for p in prompts]
    assert [greedy(llama, [p], False, n=8, stop_at_eos=False)[0] for p in prompts] == singles
    assert greedy(llama, prompts, True, n=8, stop_at_eos=False) == singles
    assert greedy(llama, prompts, False, n=8, stop_at_eos=False) == singles


def test_sampling_reproducible_and_degenerate_cases_equal_greedy(tiny_llama):
    g = greedy(tiny_llama, PROMPTS, True)
    hot = dict(temperature=1.5, use_kv_cache=True)
    a = tiny_llama.generate(PROMPTS, GEN, seed=1, **hot).tokens
    assert tiny_llama.generate(PROMPTS, GEN, seed=1, **hot).tokens == a
    assert tiny_llama.generate(PROMPTS, GEN, seed=2, **hot).tokens != a
    assert a != g
    assert tiny_llama.generate(PROMPTS, GEN, seed=3, top_k=1, **hot).tokens == g
    assert tiny_llama.generate(PROMPTS, GEN, seed=3, top_p=1e-6, **hot).tokens == g
    # the cache does not change sampled tokens either
    assert tiny_llama.generate(PROMPTS, GEN, seed=1, temperature=1.5, use_kv_cache=False).tokens == a


def test_sample_top_p_and_top_k_keep_the_right_tokens():
    """probs (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps tokens 0 and 1 (0.5 < 0.7 <= 0.8), renormalised to 5/8, 3/8;
    top_k 3 keeps 0, 1 and 2 in proportion 0.5 : 0.3 : 0.15."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, 1.0, 0.7, 0, g), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([5 / 8, 3 / 8, 0, 0]), atol=0.02, rtol=0)
    counts = torch.bincount(sample(logits, 1.0, 1.0, 3, g), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.02, rtol=0)
    # temperature 2 flattens: p ~ sqrt(p0)
    counts = torch.bincount(sample(logits, 2.0, 1.0, 0, g), minlength=4) / 20000
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(counts, flat / flat.sum(), atol=0.02, rtol=0)


def test_stop_tokens_end_each_row(tiny_llama):
    free = greedy(tiny_llama, PROMPTS, True, stop_at_eos=False)
    stop = free[0][2]  # row 0's third token
    first_stop = [next((j for j, t in enumerate(row) if t == stop), None) for row in free]
    llama = Llama(tiny_llama.model, ToyTokenizer(stop_ids={stop}), torch.device("cpu"))
    out = llama.generate(PROMPTS, GEN, use_kv_cache=True)
    for row, cut, got, stopped in zip(free, first_stop, out.tokens, out.stopped):
        assert got == (row if cut is None else row[:cut])
        assert stopped == (cut is not None)
    # when every row has stopped, generation ends early
    solo = llama.generate([PROMPTS[0]], GEN)
    assert solo.tokens == [free[0][:2]] and solo.steps == 3


def test_cache_written_in_place_and_absent_when_off(tiny_llama, monkeypatch):
    model = tiny_llama.model
    allocations = []
    original_init = KVCache.__init__

    def counting_init(self, *args, **kw):
        allocations.append(args)
        original_init(self, *args, **kw)

    monkeypatch.setattr(KVCache, "__init__", counting_init)
    seen = []  # (data_ptr of layer 0's key buffer, logits shape) at each step

    def output_shapes(module, inputs, output):
        seen.append(tuple(output.shape))

    handle = model.output.register_forward_hook(output_shapes)
    try:
        ptrs = []
        out = tiny_llama.generate(
            PROMPTS,
            8,
            use_kv_cache=True,
            on_token=lambda step, nxt: ptrs.append(model.layers[0].attention.cache.k.data_ptr()),
        )
        assert len(allocations) == model.args.n_layers  # one cache per layer, once per call
        assert len(set(ptrs)) == 1 and len(ptrs) == 8
        longest = max(map(len, PROMPTS))
        assert out.kv_cache_bytes == model.args.n_layers * 2 * 3 * 2 * (longest + 8) * 16 * 4
        assert model.cache_nbytes() == 0  # released after the call
        # every forward pass returns logits for the last position only
        assert seen and all(s == (3, 1, model.args.vocab_size) for s in seen)

        allocations.clear()
        caches = []
        out = tiny_llama.generate(
            PROMPTS,
            8,
            use_kv_cache=False,
            on_token=lambda step, nxt: caches.append([l.attention.cache for l in model.layers]),
        )
        assert allocations == [] and out.kv_cache_bytes == 0
        assert all(c is None for step in caches for c in step)
    finally:
        handle.remove()


def test_on_token_streams_every_column(tiny_llama):
    cols = []
    out = tiny_llama.generate(PROMPTS, 6, on_token=lambda step, nxt: cols.append((step, nxt.tolist())))
    assert [s for s, _ in cols] == list(range(6))
    assert [list(r) for r in zip(*[c for _, c in cols])] == out.tokens


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_prefill_then_decode_one_token_matches_a_full_forward(tiny_llama, use_kv_cache):
    """Teacher-forced: prefill + decode steps over left-padded rows give, at every new position, the logits of one
    plain forward over each row alone (no cache, no padding)."""
    model, n_new = tiny_llama.model, 6
    cont = torch.randint(0, 256, (len(PROMPTS), n_new), generator=torch.Generator().manual_seed(0))
    P = max(map(len, PROMPTS))
    tokens = torch.zeros(len(PROMPTS), P + n_new, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, P - len(p) : P] = torch.tensor(p)
    tokens[:, P:] = cont
    pad_lens = torch.tensor([P - len(p) for p in PROMPTS])
    with torch.inference_mode():
        if use_kv_cache:
            model.setup_cache(len(PROMPTS), P + n_new)
        try:
            steps = [prefill(model, tokens[:, :P], pad_lens)]
            steps += [decode_one_token(model, tokens, cur, pad_lens, use_kv_cache) for cur in range(P + 1, P + n_new)]
        finally:
            model.clear_cache()
        got = torch.cat(steps, dim=1)  # (B, n_new, V): logits for tokens P .. P+n_new-1
        for i, p in enumerate(PROMPTS):
            row = torch.cat([torch.tensor(p), cont[i]])[None]
            ref = model(row)[0, len(p) - 1 : -1]  # (n_new, V)
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_prompt_longer_than_context_is_a_user_error(tiny_llama):
    from llama.errors import UserError

    with pytest.raises(UserError, match="exceeds the model's context"):
        tiny_llama.generate([[1] * 120], 16)
    with pytest.raises(UserError):
        tiny_llama.generate([[]], 4)
