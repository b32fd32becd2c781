"""LoRA against its defining equation and the base model: init, freezing, merge, counts, adapter files."""

import copy
import math

import pytest
import torch
from tiny_finetune import tiny_model
from torch import nn

from llama.checkpoint import SHAPES, load_checkpoint, save_meta
from llama.errors import UserError
from llama.model import Transformer
from project.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
)


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(0, 259, shape, generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model, seed=1):
    """Give B (zero at init) and A random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_forward_is_the_lora_equation():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=12.0, dropout=0.0)
    perturb_adapters(layer)
    x = torch.randn(3, 5, 8)
    expected = x @ base.weight.T + (12.0 / 4) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (6, 4)
    # Kaiming-uniform with a=sqrt(5): bound = 1/sqrt(in_features); B starts at zero.
    fresh = LoRALinear(nn.Linear(8, 6, bias=False), r=4, alpha=8.0)
    assert fresh.lora_A.abs().max() <= 1 / math.sqrt(8) and fresh.lora_A.std() > 0
    assert torch.count_nonzero(fresh.lora_B) == 0


def test_dropout_is_on_the_lora_input_only():
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=2, alpha=4.0, dropout=1.0)  # drops every input
    perturb_adapters(layer)
    x = torch.randn(4, 8)
    layer.train()
    torch.testing.assert_close(layer(x), layer.base(x))  # the adapter sees only zeros
    layer.eval()
    assert not torch.allclose(layer(x), layer.base(x))


def test_init_output_equals_base_and_only_a_b_train():
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(targets=("wq", "wv"), r=4, alpha=8.0, dropout=0.05)).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.attention.{w}.lora_{m}" for i in range(4) for w in ("wq", "wv") for m in "AB"}
    assert trainable == expected


def test_merged_equals_unmerged_after_training_steps():
    model = apply_lora(tiny_model(), LoRAConfig(targets=("wq", "wk", "wv", "wo", "w1"), r=4, alpha=8.0, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(shape=(2, 16))
    for _ in range(5):
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.count_nonzero(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        unmerged = model(x)
        before_merge = {n: p.clone() for n, p in model.state_dict().items()}
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()
        for n, p in model.state_dict().items():
            torch.testing.assert_close(p, before_merge[n], rtol=1e-6, atol=1e-6)


def test_trainable_count_for_llama_3_2_1b_shape():
    with torch.device("meta"):
        model = Transformer(SHAPES["llama3.2-1b"])
        apply_lora(model, LoRAConfig(targets=("wq", "wv"), r=16, alpha=32, dropout=0.05))
    trainable, total = count_parameters(model)
    assert trainable == 16 * (16 * (2048 + 2048) + 16 * (2048 + 512)) == 1_703_936
    assert total == 1_235_814_400 + trainable  # Llama 3.2-1B (tied embeddings) + the adapters


def test_adapter_roundtrip_and_mismatch(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8.0))
    perturb_adapters(model)
    path = tmp_path / "adapter.pt"
    save_adapter(model, path, LoRAConfig(r=4, alpha=8.0))
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(adapter_state_dict(model)) and len(saved["state_dict"]) == 16

    other = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8.0))
    assert load_adapter(other, path)["r"] == 4
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(other)[k], v)
    with pytest.raises(UserError, match="rank"):
        load_adapter(apply_lora(tiny_model(), LoRAConfig(r=2, alpha=8.0)), path)
    with pytest.raises(UserError, match="targets"):
        load_adapter(apply_lora(tiny_model(), LoRAConfig(targets=("wq",), r=4, alpha=8.0)), path)


def test_merged_model_saves_in_a_format_the_loader_reads(tmp_path):
    model = apply_lora(tiny_model(vocab_size=128256), LoRAConfig(r=4, alpha=8.0)).eval()  # the Llama 3 vocabulary
    perturb_adapters(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_meta(model, tmp_path / "merged")  # no tokenizer file: the loader falls back to the Llama 3 one
    loaded, _ = load_checkpoint(tmp_path / "merged", torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_no_matching_target_is_a_user_error():
    with pytest.raises(UserError, match="no linear layer"):
        apply_lora(tiny_model(), LoRAConfig(targets=("q_proj",)))
