"""LoRA adapters in peft's format (project/export.py), checked against transformers + peft themselves."""

import json

import pytest
import torch
from tiny_finetune import write_tiny_checkpoint

from llama.checkpoint import load_checkpoint
from llama.errors import UserError
from project.export import load_peft_adapter, peft_config, save_peft_adapter
from project.model.lora import LoRAConfig, apply_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CFG = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=("wq", "wk", "wv", "w1"))  # q and k: the rotary rows
X = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 5, 9]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base"), seed=6)  # 4 query heads, 2 key/value heads


def ours_with_random_adapters(base):
    model, _ = load_checkpoint(base, torch.float32, "cpu")
    torch.manual_seed(0)
    apply_lora(model, CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def hf_logits_with(base, adapter_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return model(X).logits


def test_our_adapter_in_peft_format_gives_peft_the_same_logits(base, tmp_path):
    ours = ours_with_random_adapters(base)
    save_peft_adapter(ours, tmp_path / "adapter", CFG, base_model=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj"] and config["lora_alpha"] == 8.0
    with torch.no_grad():
        expected = ours(X)
        plain, _ = load_checkpoint(base, torch.float32, "cpu")
        assert (plain(X) - expected).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(hf_logits_with(base, tmp_path / "adapter"), expected, rtol=1e-4, atol=1e-4)


def test_a_peft_made_adapter_loads_into_ours_with_the_same_logits(base, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
        init_lora_weights=False,
    )  # fmt: skip  (random B: a non-trivial adapter)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "made_by_peft")
    expected = hf_logits_with(base, tmp_path / "made_by_peft")
    ours, _ = load_checkpoint(base, torch.float32, "cpu")
    cfg = peft_config(tmp_path / "made_by_peft")
    assert cfg.targets == ("wq", "wk", "wv", "w1") and cfg.r == 4 and cfg.alpha == 8.0
    apply_lora(ours, cfg)
    load_peft_adapter(ours, tmp_path / "made_by_peft")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(X), expected, rtol=1e-4, atol=1e-4)


def test_a_peft_adapter_for_another_setup_is_refused(base, tmp_path):
    save_peft_adapter(ours_with_random_adapters(base), tmp_path / "adapter", CFG)
    model, _ = load_checkpoint(base, torch.float32, "cpu")
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=("wq", "wv")))
    with pytest.raises(UserError, match="other projections or layers"):
        load_peft_adapter(model, tmp_path / "adapter")
