"""Weight-only quantization against hand-derived bounds and against its own dequantized reference path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyTokenizer, tiny_model
from torch import nn

from llama.errors import UserError
from llama.generation import Llama
from llama.model import ColumnBlocks, Linear, fuse_projections
from project.memory import weight_bytes
from project.quant import (
    FBGEMM_WEIGHT_LEVELS,
    PACKED_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    W8A8Linear,
    kernel_for,
    pack_pairs,
    quantize,
    quantize_int4,
    quantize_int8,
    tinygemm_tiles,
    unpack_int4,
)

CPU = torch.device("cpu")


def linear(n_out=48, n_in=64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, n_out)[:, None])  # rows of very different ranges
    return layer


def test_int8_round_trip_is_within_half_a_step():
    w = linear().weight.detach()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    # The largest |w| of each row maps to exactly +-127: the full range is used.
    assert torch.equal(q.abs().amax(dim=1), torch.full((w.shape[0],), 127, dtype=torch.int8))
    err = (w - s[:, None] * q.float()).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_int4_round_trip_is_within_half_a_step_per_group():
    w = linear().weight.detach()
    q, s, m = quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and q.max() <= 15 and s.shape == m.shape == (48, 2)
    deq = (q.float().reshape(48, 2, 32) * s[..., None] + m[..., None]).reshape(48, 64)
    assert ((w - deq).abs().reshape(48, 2, 32) <= s[..., None] / 2 + 1e-6).all()
    # Each group's minimum and maximum are levels 0 and 15 exactly.
    g = w.reshape(48, 2, 32)
    assert torch.allclose(deq.reshape(48, 2, 32).amin(-1), g.amin(-1)) and torch.allclose(
        deq.reshape(48, 2, 32).amax(-1), g.amax(-1), atol=1e-6
    )


def test_int4_weights_already_on_a_4_bit_grid_come_back_exactly():
    """A GGUF Q4_1 block (w = d q + m, 32 columns) quantized again with group 32 loses nothing."""
    torch.manual_seed(1)
    d, m = torch.rand(8, 2, 1) + 0.1, torch.randn(8, 2, 1)
    levels = torch.randint(0, 16, (8, 2, 32)).float()
    levels[..., 0], levels[..., 1] = 0, 15  # the block's own minimum and maximum
    w = (d * levels + m).reshape(8, 64)
    q, s, lo = quantize_int4(w, 32)
    deq = (q.float().reshape(8, 2, 32) * s[..., None] + lo[..., None]).reshape(8, 64)
    torch.testing.assert_close(deq, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_output_error_is_bounded(mode):
    """|x W^T - x W_hat^T| <= sum_k |x_k| * s/2: each weight is off by at most half its step (fp32 fallback)."""
    layer, x = linear(), torch.randn(5, 64)
    q = Int8Linear(layer, "dequantize") if mode == "int8" else Int4Linear(layer, 32, "dequantize")
    y, ref = q(x), x @ layer.weight.detach().T
    if mode == "int8":
        step = q.scales[None, :].expand(64, -1)  # (K, N)
    else:
        step = q.scales_zeros[..., 0].repeat_interleave(32, dim=0)  # (K/G, N) scales -> (K, N)
    bound = x.abs() @ (step / 2)
    assert ((y - ref).abs() <= bound + 1e-5).all()
    assert (y - ref).abs().max() > 0  # quantization did change something: the test is not vacuous
    torch.testing.assert_close(y, x @ q.dequantize().T)


@pytest.mark.skipif(kernel_for(CPU, "int8") != "packed", reason="no packed int8 kernel in this PyTorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int8_kernel_matches_the_fallback(dtype):
    layer = linear().to(dtype)
    x = torch.randn(3, 7, 64, dtype=dtype)
    packed, plain = Int8Linear(layer, "packed"), Int8Linear(layer, "dequantize")
    y = packed(x)
    assert y.dtype == dtype and y.shape == (3, 7, 48)
    ref = plain(x).float()
    # The kernel computes in bf16 (an fp32 model's activations are cast): bf16 rounding of x and the output.
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.skipif(kernel_for(CPU, "int8") != "packed", reason="no packed int8 kernel in this PyTorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int8_single_row_under_compile_is_a_fused_sum(dtype):
    """Compiled, one row through a packed int8 layer is a multiply and a sum along the levels' rows times the
    scales (no packed kernel in the graph); three rows keep the kernel. The row agrees with x (q s)^T in fp64 within
    the error bound of fp32 sums (K fp32 roundings of the sum of |x q s|) plus one rounding to dtype."""
    torch.manual_seed(0)
    layer = Int8Linear(linear(n_in=320, n_out=96).to(dtype), "packed")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    run = torch.compile(layer, backend=capture, dynamic=False, fullgraph=True)
    w = layer.q.double() * layer.scales.double()[:, None]
    x = torch.randn(1, 1, 320).to(dtype)
    with torch.no_grad():
        got = run(x).double()
        run(torch.randn(1, 3, 320).to(dtype))
    ref = x.double() @ w.T
    bound = 320 * 2**-24 * (x.double().abs() @ w.abs().T) + (2**-8 if dtype == torch.bfloat16 else 2**-24) * ref.abs()
    assert got.dtype == torch.float64 and ((got - ref).abs() <= bound + 1e-12).all()
    single, several = graphs
    assert not any("int8pack" in t for t in single) and "efficient_llama.materialize" in single
    assert any("int8pack" in t for t in several)


def test_int4_packed_layout_unpacks_to_the_levels():
    """The packed CPU layout, read back by unpack_int4, gives every level where it was (checked on known values)."""
    if kernel_for(CPU, "int4") != "packed":
        pytest.skip("no packed int4 kernel in this PyTorch")
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    assert torch.equal(unpack_int4(packed, 128, 96), q)
    layer = Int4Linear(linear(n_out=128, n_in=96), 32, "packed")
    assert layer.kernel == "packed" and layer.q.shape == (128, 48)  # half a byte per weight, no second copy


def unpack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """pack_pairs' bytes back to (N, K) levels, byte by byte: high nibble first."""
    return torch.stack([pairs // 16, pairs % 16], dim=-1).flatten(1)


def test_int4_plain_layout_is_two_levels_a_byte_high_nibble_first():
    """Worked by hand: levels 1, 2 | 15, 0 in a row pack to bytes 0x12 and 0xF0; the fallback layer stores half a
    byte per weight and dequantizes each level back to its place."""
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_pairs(q).tolist() == [[0x12, 0xF0]]
    layer = Int4Linear(linear(n_out=48, n_in=64), 32, "dequantize")
    assert layer.q.shape == (48, 32) and layer.q.dtype == torch.uint8
    q, s, m = quantize_int4(linear(n_out=48, n_in=64).weight.detach(), 32)
    assert torch.equal(unpack_pairs(layer.q), q)
    expected = (q.float().reshape(48, 2, 32) * s[..., None] + m[..., None]).reshape(48, 64)
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=1e-6)


def test_kernel_choice_off_cpu_needs_no_gpu_to_decide_the_fallbacks():
    """int8 off CPU, and int4 for training (backward needs the plain layout), take the dequantize fallback;
    tinygemm's inner k-tiling is the widest of 8, 4, 2 tiles of 16 columns that divides the width."""
    cuda = torch.device("cuda")
    assert kernel_for(cuda, "int8") == "dequantize" and kernel_for(cuda, "int4", training=True) == "dequantize"
    assert kernel_for(torch.device("mps"), "int4") == "dequantize"
    assert [tinygemm_tiles(k) for k in (2048, 576, 96, 40)] == [8, 4, 2, None]  # 576 = 36 * 16: 4 tiles of 16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_of_fp32_activations_uses_the_fp32_matmul(mode):
    """Above PACKED_MAX_ROWS[mode] rows of fp32 activations a packed layer computes x @ dequantized W^T in fp32 (int8
    with fewer rows than columns: the levels, then the scales on the products), and agrees with the packed kernel's
    own result on fewer rows."""
    base = linear(n_out=128, n_in=64)
    layer = Int8Linear(base, kernel_for(CPU, mode)) if mode == "int8" else Int4Linear(base, 32, kernel_for(CPU, mode))
    x = torch.randn(PACKED_MAX_ROWS[mode] + 1, 64)
    if mode == "int8":
        weight = layer.q.float() * layer.scales.float()[:, None]
    else:  # scale * (level - 8) + zero, group by group, from the stored levels and (K/G, N, 2) scales and zeros
        levels = unpack_int4(layer.q, 128, 64) if layer.kernel == "packed" else unpack_pairs(layer.q)
        sz = layer.scales_zeros.float().repeat_interleave(32, dim=0)  # (K, N, 2)
        weight = ((levels.float().T - 8) * sz[..., 0] + sz[..., 1]).T
    torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)
    few = layer(x[:4])
    torch.testing.assert_close(few, x[:4] @ weight.T, rtol=2e-2, atol=2e-2 * few.abs().max().item())
    if layer.kernel == "packed":  # up to the threshold itself the kernel, on bf16 activations, is what runs
        most = x[:-1].bfloat16()
        if mode == "int8":
            packed = torch._weight_int8pack_mm(most, layer.q, layer.scales)
        else:
            packed = torch.ops.aten._weight_int4pack_mm_for_cpu(most, layer.q, 32, layer.scales_zeros)
        torch.testing.assert_close(layer(x[:-1]), packed.float(), rtol=0, atol=0)


def test_fp16_int8_rows_multiply_the_dequantized_weight():
    """In fp16 (GPUs without bf16) an int8 layer multiplies the dequantized weight even for fewer rows than columns:
    the unscaled products of the levels could leave fp16's range. Levels of 127 against 64 inputs of 20 sum to
    162560 unscaled (fp16 overflows at 65504), to 64 once scaled by 0.05 / 127."""
    base = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        base.weight.fill_(0.05)
    layer = Int8Linear(base.to(torch.float16), "dequantize")
    x = torch.full((3, 64), 20.0, dtype=torch.float16)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((3, 8), 64 * 20 * 0.05), rtol=1e-2, atol=0)


@pytest.mark.parametrize("native", [True, False])
def test_prefill_of_bf16_activations_dequantizes_only_where_bf16_is_native(monkeypatch, native):
    """A bf16 prefill takes the bf16 matmul where the CPU multiplies bf16 natively, and stays on the packed kernel
    where bf16 matmuls would be emulated; decoding rows always take the packed kernel. The bf16 matmul multiplies
    the int8 levels and scales its M x N products by channel where there are fewer rows than columns (M < K), and
    multiplies the dequantized weight otherwise."""
    import project.quant as quant

    monkeypatch.setattr(quant, "native_matmul", lambda device, dtype: native)
    layer = Int8Linear(linear(n_out=128, n_in=64).to(torch.bfloat16), kernel_for(CPU, "int8"))
    levels, scales = layer.q.to(torch.bfloat16), layer.scales
    weight = (layer.q.float() * scales.float()[:, None]).to(torch.bfloat16)
    for rows in (PACKED_MAX_ROWS["int8"] + 1, 64):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        packed = torch._weight_int8pack_mm(x, layer.q, scales)
        if not native:
            want = packed
        elif rows < 64:
            want = F.linear(x, levels) * scales
        else:
            want = F.linear(x, weight)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        torch.testing.assert_close(layer(x[:4]), packed[:4], rtol=0, atol=0)


@pytest.mark.skipif(kernel_for(CPU, "int4") != "packed", reason="no packed int4 kernel in this PyTorch")
@pytest.mark.parametrize("group_size", [32, 64])
def test_packed_int4_kernel_matches_the_fallback(group_size):
    layer = linear(n_out=64, n_in=128)
    x = torch.randn(2, 5, 128)
    y, ref = Int4Linear(layer, group_size, "packed")(x), Int4Linear(layer, group_size, "dequantize")(x)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int4_dequantizes_as_the_plain_layout(dtype):
    """Two 64-row blocks of the packed layout, unpacked through the scratch bytes: the same weights, bit for bit,
    as the plain two-levels-a-byte layout gives (and again on a second call, the scratch reused). A bf16 layer, so
    that both keep their scales in bf16 (the packed kernel's, see kernel_dtype)."""
    layer = linear(n_out=128, n_in=96).to(torch.bfloat16)
    packed, plain = Int4Linear(layer, 32, "packed"), Int4Linear(layer, 32, "dequantize")
    assert packed.kernel == "packed" and plain.kernel == "dequantize"
    expected = plain.dequantize(dtype)
    assert torch.equal(packed.dequantize(dtype), expected)
    assert torch.equal(packed.dequantize(dtype, out=torch.empty_like(expected)), expected)


def test_quantize_replaces_every_block_linear_and_the_output():
    model = tiny_model()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    text = quantize(model, QuantConfig("int8"))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == n_linear
    assert text.startswith(f"int8 weights ({n_linear - 1} block linears and the output projection)")
    kept = tiny_model()
    quantize(kept, QuantConfig("int4", output="none"))
    assert isinstance(kept.output, nn.Linear) and isinstance(kept.layers[0].attention.wq, Int4Linear)


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_column_blocks_are_quantized_block_by_block_under_int8_and_joined_otherwise(mode):
    """A w2 held in column blocks (llama.model.ColumnBlocks): int8 quantizes each block with its own scales (the
    levels of each block's maximum reach 127) and the layer gives the sum of the blocks' dequantized products;
    int4 and w8a8 quantize the one joined weight, as for an unsplit model."""
    model, plain = fuse_projections(tiny_model(seed=2), long_row=64), fuse_projections(tiny_model(seed=2))
    w = plain.layers[0].feed_forward.w2.weight.detach().clone()
    text, plain_text = quantize(model, QuantConfig(mode)), quantize(plain, QuantConfig(mode))
    if mode == "int8":  # 2 layers: wqkv, wo, w13 and w2's 3 blocks each
        assert text.startswith("int8 weights (12 block linears (6 of them column blocks) and the output projection)")
    else:
        assert text == plain_text and "column blocks" not in text
    w2 = model.layers[0].feed_forward.w2
    x = torch.randn(3, 96)
    if mode != "int8":
        assert type(w2) is type(plain.layers[0].feed_forward.w2)
        with torch.no_grad():
            assert torch.equal(w2(x), plain.layers[0].feed_forward.w2(x))
        return
    assert isinstance(w2, ColumnBlocks) and all(isinstance(p, Int8Linear) for p in w2.parts)
    for j, part in enumerate(w2.parts):
        cols = w[:, 32 * j : 32 * (j + 1)]
        assert torch.equal(part.scales, (cols.abs().amax(dim=1) / 127).to(part.scales.dtype))  # bf16: the kernel's
        assert (part.q.abs().amax(dim=1) == 127).all()
    with torch.no_grad():
        want = sum(x[:, 32 * j : 32 * (j + 1)] @ p.dequantize().T for j, p in enumerate(w2.parts))
        torch.testing.assert_close(w2(x), want, atol=2e-2, rtol=2e-2)  # the packed kernel takes bf16 rows


W8A8_KERNELS = ["dequantize"] + (["fbgemm"] if kernel_for(CPU, "w8a8") == "fbgemm" else [])


def w8a8_reference(layer: nn.Linear, x: torch.Tensor, weight_levels: int) -> torch.Tensor:
    """The module docstring's w8a8 formula in float64, by hand: each row of x to integers in [-127, 127] by its own
    max |x|, the weights to [-weight_levels, weight_levels] by their row's max |w|, integer dot products, scales."""
    w, x = layer.weight.detach().double(), x.double()
    s = w.abs().amax(dim=1) / weight_levels
    q = torch.round(w / s[:, None])
    r = x.abs().amax(dim=1, keepdim=True)
    a = torch.round(x / r * 127)
    return (a @ q.T) * (r / 127) * s


@pytest.mark.parametrize("kernel,weight_levels", [(k, n) for k in W8A8_KERNELS for n in (127, 63)])
def test_w8a8_is_integer_arithmetic_on_per_token_levels(kernel, weight_levels):
    """Also at the activations' extremes (every product as large as it gets), where 8-bit weights would saturate a
    CPU without VNNI: 63-level weights (the default there) must give the exact sums on any CPU."""
    layer, x = linear(), torch.randn(9, 64) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different ranges
    x[0] = torch.sign(layer.weight.detach()[0]) * 3  # row 0: |x| at its max everywhere, signs matching weight row 0
    if kernel == "fbgemm" and weight_levels == 127 and FBGEMM_WEIGHT_LEVELS < 127:
        x = x[1:]  # saturates without VNNI: why such CPUs get 63 levels
    q = W8A8Linear(layer, kernel, weight_levels)
    y, ref = q(x).double(), w8a8_reference(layer, x, weight_levels)
    # A value on a rounding boundary may go either way: one activation level of one column, times the weight's.
    one_level = (x.abs().amax(dim=1, keepdim=True).double() / 127) * layer.weight.detach().abs().amax(dim=1)
    assert ((y - ref).abs() <= one_level + 1e-6 * ref.abs()).all()
    assert (y - ref).abs().median() < 1e-5 * ref.abs().median()  # and almost every value is exact


@pytest.mark.parametrize("kernel", W8A8_KERNELS)
def test_w8a8_error_is_bounded_and_rows_are_independent(kernel):
    """x_hat = x + e, W_hat = W + E with |e| <= d/2 (d = max|x_row| / levels), |E| <= s/2:
    |x_hat W_hat^T - x W^T| <= sum_k |w_nk| d/2 + |x_k| s_n/2 + d s_n/4. And a row's result is the same alone."""
    layer, x = linear(), torch.randn(6, 64)
    q = W8A8Linear(layer, kernel)
    y, ref = q(x), x @ layer.weight.detach().T
    d = x.abs().amax(dim=1, keepdim=True) / 127  # (M, 1)
    s = q.scales[None, :]  # (1, N)
    w = layer.weight.detach().abs()
    bound = d * w.sum(dim=1) / 2 + x.abs() @ (s.expand(64, -1) / 2) + 64 * d * s / 4
    assert ((y - ref).abs() <= bound + 1e-5).all()
    assert (y - ref).abs().max() > 0
    for i in range(len(x)):
        torch.testing.assert_close(q(x[i : i + 1]), y[i : i + 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.dequantize(), W8A8Linear(layer, "dequantize", q.weight_levels).dequantize())


@pytest.mark.skipif("fbgemm" not in W8A8_KERNELS, reason="no FBGEMM in this PyTorch")
def test_w8a8_fbgemm_layer_copies_and_counts_its_packed_weights():
    """The kernel's packed weight lives outside PyTorch's tensors: a copy must work on its own after the original
    is gone, and weight_bytes must count it (one byte per weight, plus the scales)."""
    import copy
    import gc

    layer, x = linear(), torch.randn(3, 64)
    original = W8A8Linear(layer, "fbgemm")
    y = original(x)
    dup = copy.deepcopy(original)
    del original
    gc.collect()
    torch.testing.assert_close(dup(x), y, rtol=0, atol=0)
    model = tiny_model()
    linears = [m.weight.shape for m in model.modules() if isinstance(m, nn.Linear)]
    n_weights, n_rows = sum(n * k for n, k in linears), sum(n for n, _ in linears)
    before = weight_bytes(model)
    quantize(model, QuantConfig("w8a8"))
    # fp32 weights (4 bytes) -> int8 levels (1 byte); per row: a buffered fp32 scale, and the kernel's 12 bytes
    assert weight_bytes(model) == before - 3 * n_weights + 16 * n_rows


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_model_stays_close_and_cache_on_off_agree(mode):
    ref = tiny_model(dim=64, hidden_dim=128)
    model = tiny_model(dim=64, hidden_dim=128)
    quantize(model, QuantConfig(mode))
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        a, b = F.log_softmax(ref(x), -1), F.log_softmax(model(x), -1)
    # The quantized model's next-token distribution stays near the original (KL per position, nats).
    kl = (a.exp() * (a - b)).sum(-1)
    assert kl.max() < {"int8": 0.05, "w8a8": 0.1, "int4": 0.5}[mode]
    llama = Llama(model, ToyTokenizer(), CPU)
    on = llama.generate([[1, 2, 3, 4]], 12, use_kv_cache=True, stop_at_eos=False).tokens
    off = llama.generate([[1, 2, 3, 4]], 12, use_kv_cache=False, stop_at_eos=False).tokens
    assert on == off


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_layers_take_rows_that_are_not_contiguous(mode):
    """Without autograd the fused SwiGLU (llama.model.FeedForward) hands w2 the gate half of w13's output, a view
    whose rows are not contiguous: each layer gives what it gives a contiguous copy, for decode rows (the packed
    kernels) and a prefill's, in bf16 (an fp32 model's rows are copied into bf16 before the kernels anyway)."""
    model = tiny_model(dim=64, hidden_dim=128).to(torch.bfloat16)
    quantize(model, QuantConfig(mode))
    w2 = model.layers[0].feed_forward.w2
    for rows in (3, 40):
        x = torch.randn(rows, 256).to(torch.bfloat16)[:, :128]
        with torch.no_grad():
            assert torch.equal(w2(x), w2(x.contiguous()))


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="--quantize"):
        QuantConfig("int3")
    with pytest.raises(UserError, match="--group_size"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(UserError, match="multiple of"):
        quantize_int4(torch.randn(4, 40), 32)


@pytest.mark.parametrize(
    "mode,output,cls",
    [("int4", "auto", Int8Linear), ("int8", "auto", Int8Linear), ("w8a8", "auto", W8A8Linear),
     ("int4", "int4", Int4Linear), ("int8", "int4", Int4Linear), ("int4", "none", Linear)],
)  # fmt: skip
def test_the_output_projection_takes_its_own_format(mode, output, cls):
    """auto: int8 under int4 blocks (4 bits cost the output projection most), else the blocks' format."""
    model = tiny_model()
    quantize(model, QuantConfig(mode, output=output))
    assert type(model.output) is cls
    assert type(model.layers[0].attention.wq) is {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}[mode]


def test_quant_config_names_its_output_format_when_not_the_default():
    assert QuantConfig("int4").name == "int4-g32" and QuantConfig("int4").output_mode == "int8"
    assert QuantConfig("int4", output="int8").name == "int4-g32"
    assert QuantConfig("int4", output="int4").name == "int4-g32, output int4"
    assert QuantConfig("w8a8", output="none").name == "w8a8, output none"
    assert QuantConfig("none", output="int4").output_mode == "none"  # unquantized blocks: nothing is quantized
    with pytest.raises(UserError, match="--quantize_output must be one of"):
        QuantConfig("int4", output="int2")
