"""LoRA on a frozen base held in 16 bits or quantized (project/frozen_base.py): what is held in which dtype, and
that the adapters train and get the gradients an fp32 base gives them."""

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from tiny_finetune import RECORDS, byte_tokenizer, tiny_model

from llama.errors import UserError
from llama.runtime import DTYPES
from project import quant
from project.data import build_dataset, collate
from project.frozen_base import StoredLinear, load_dtype, prepare, resolve_base
from project.model.lora import LoRAConfig
from project.quant import Int4Linear, Int8Linear
from project.train import (
    NextTokenLoss,
    TrainConfig,
    autocast,
    label_tokens,
    loss_sum,
    make_optimizer,
    make_scaler,
    train_step,
)

LORA = LoRAConfig(dropout=0.0)


def test_auto_holds_a_lora_base_in_the_autocast_dtype_and_full_fine_tuning_in_fp32():
    assert resolve_base("auto", "bf16", lora=True) == "bf16"
    assert resolve_base("auto", "fp16", lora=True) == "fp16"
    assert resolve_base("auto", "fp32", lora=True) == "fp32"
    assert resolve_base("auto", "bf16", lora=False) == "fp32"  # full fine-tuning: fp32 master weights
    assert resolve_base("INT4", "fp32", lora=True) == "int4"
    with pytest.raises(UserError, match="needs LoRA"):
        resolve_base("int8", "fp32", lora=False)
    assert resolve_base("bf16", "fp32", lora=True) == "bf16"  # stored in bf16, computed in fp32
    with pytest.raises(UserError, match="--base bf16 goes with --precision bf16"):
        resolve_base("bf16", "fp16", lora=True)
    with pytest.raises(UserError, match="must be one of"):
        resolve_base("nf4", "fp32", lora=True)


def model_on(base: str, seed: int = 0, precision: Optional[str] = None):
    """The tiny model with LoRA on wq/wv on the given base (computed in the base's dtype unless precision says
    otherwise); B random (not zero) so that A gets gradients too."""
    precision = precision or (base if base in ("bf16", "fp16") else "fp32")
    model = tiny_model(seed, tie_word_embeddings=True).to(load_dtype(base, precision))
    model.reset_rope()  # as the loaders do: the rotary frequencies stay fp32
    torch.manual_seed(0)
    prepare(model, LORA, base, precision)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def bytes_by_dtype(model) -> dict:
    out = {}
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return out


def batch():
    ds = build_dataset(RECORDS[:3], byte_tokenizer(), max_seq_len=512)
    return collate(ds.examples, pad_id=257)


def adapter_grads(model, precision: str) -> dict:
    ids, labels = batch()
    with autocast(ids.device, precision):
        loss = loss_sum(model, ids, labels) / label_tokens(labels)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("base", ["bf16", "fp16"])
def test_a_16_bit_base_holds_no_fp32_weight_and_its_adapters_are_fp32(base):
    model = model_on(base)
    held = bytes_by_dtype(model)
    adapters = sum(p.nbytes for n, p in model.named_parameters() if "lora_" in n)
    rope = model.inv_freq.nbytes  # the rotary frequencies, a buffer computed in fp32
    assert held[torch.float32] == adapters + rope  # nothing else in fp32: no master copy of the base
    assert held[DTYPES[base]] == sum(p.nbytes for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_a_16_bit_stored_base_keeps_the_block_linears_in_16_bits_and_the_rest_fp32():
    model = model_on("bf16", precision="fp32")
    stored = [m for m in model.modules() if isinstance(m, StoredLinear)]
    assert len(stored) == 4 * 7 and all(m.weight.dtype == torch.bfloat16 for m in stored)
    held = bytes_by_dtype(model)
    assert held[torch.bfloat16] == sum(m.weight.nbytes for m in stored)
    assert model.tok_embeddings.weight.dtype == model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("base", ["bf16", "fp16", "bf16-stored", "int8", "int4"])
def test_adapter_gradients_match_those_on_an_fp32_base(base):
    """Same adapters, same batch: the gradients differ only by the base's rounding. Tolerances (relative
    error of the whole gradient): 16-bit bases 6% (the residual stream itself is 16-bit there), a bf16-stored
    base under fp32 arithmetic 3%, int8 5%,
    int4 70% (4-bit levels, one scale per 32-wide row of a tiny random model); another fp32 base gives
    gradients over 100% away, so the tolerances tell right from wrong."""
    precision = base if base in ("bf16", "fp16") else "fp32"
    reference = adapter_grads(model_on("fp32"), precision)
    got = adapter_grads(model_on(base.removesuffix("-stored"), precision=precision), precision)
    tolerance = {"bf16": 0.06, "fp16": 0.06, "bf16-stored": 0.03, "int8": 0.05, "int4": 0.7}[base]
    other = adapter_grads(model_on("fp32", seed=1), precision)
    assert set(got) == set(reference) and len(got) == 4 * 4  # A and B of wq, wv in 4 layers
    for name, g in got.items():
        assert g.dtype == torch.float32
        err = (g - reference[name]).norm() / reference[name].norm()
        assert err < tolerance, (name, float(err))
        assert (other[name] - reference[name]).norm() / reference[name].norm() > 1.0


@pytest.mark.parametrize("base", ["bf16", "bf16-stored", "int8", "int4"])
def test_lora_on_a_low_precision_base_lowers_the_loss_on_a_repeated_batch(base):
    precision = "bf16" if base == "bf16" else "fp32"
    model = model_on(base.removesuffix("-stored"), precision=precision)
    model.train()
    cfg = TrainConfig(lr=0.05, optimizer="adamw", precision=precision)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = make_scaler(torch.device("cpu"), precision)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    ids, labels = batch()
    losses = [train_step(NextTokenLoss(model), [(ids, labels)], optimizer, scaler, precision).loss for _ in range(12)]
    assert max(losses[-3:]) < 0.8 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # the base never moved


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_a_quantized_base_trains_after_generating_under_inference_mode(base, monkeypatch):
    """finetuning.py samples before training: the dequantization buffer made then must stay writable."""
    monkeypatch.setattr(quant, "_SCRATCH", {})  # this test's first dequantization is the one in inference mode
    model = model_on(base)
    ids, labels = batch()
    with torch.inference_mode():
        model(ids)
    cfg = TrainConfig(lr=0.05, optimizer="adamw")
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = make_scaler(torch.device("cpu"), "fp32")
    result = train_step(NextTokenLoss(model), [(ids, labels)], optimizer, scaler, "fp32")
    assert math.isfinite(result.loss)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_layer_input_gradient_is_that_of_its_dequantized_weight(cls):
    linear = torch.nn.Linear(64, 128, bias=False)
    layer = Int8Linear(linear, "packed") if cls is Int8Linear else Int4Linear(linear, 32, "packed")
    x = torch.randn(3, 40, 64, requires_grad=True)  # more rows than the packed kernel takes: dequantized path
    y = layer(x)
    y.backward(torch.ones_like(y))
    expected = x.detach().clone().requires_grad_(True)
    reference = F.linear(expected, layer.dequantize())
    reference.backward(torch.ones_like(reference))
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(x.grad, expected.grad)
    assert not any(t.requires_grad for t in layer.buffers())
    small = torch.randn(2, 64, requires_grad=True)  # a few rows: the packed kernel forward, same backward
    layer(small).sum().backward()
    torch.testing.assert_close(small.grad, layer.dequantize().sum(0).expand(2, 64))
