"""What a fine-tuning run leaves for other tools: the adapter in peft's format, the merged model as a Hugging Face
folder or a GGUF file (llama/export.py writes those two), from a finished run or at the end of one.

    python -m project.export --run_dir runs/finetune --formats hf,gguf     # export an existing run

LoRA adapters in peft's format, so that a run made here loads in transformers + peft (and one made there here).

peft's folder: `adapter_config.json` (r, lora_alpha, target_modules, ...) and `adapter_model.safetensors` with
tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (A: (r, in), B: (out, r)).
Hugging Face stores q/k rows in rotate-half order where Meta (and this project) interleave the rotary pairs,
so the rows of wq's and wk's B are permuted exactly as the base weights are (llama/checkpoint.py); A acts on
the input side, which no layout changes. Only LoRA A and B leave: the base model is whatever checkpoint the
adapter was trained on (`base_model_name_or_path` records where it came from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llama.checkpoint import ModelSource, atomic_write, interleaved_to_rotate_half, rotate_half_to_interleaved
from llama.errors import UserError
from llama.export import GGUF_TYPES, save_gguf, save_hf_folder
from llama.runtime import log
from project.cli import name_list, run, writable_dir
from project.frozen_base import QUANTIZED
from project.model.lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    adapter_config,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
)

EXPORT_FORMATS = ("peft", "hf", "gguf")

HF_MODULES = {  # our projection -> (HF module path inside a decoder layer)
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}
ROTARY = {"wq": "n_heads", "wk": "n_kv_heads"}  # B rows follow the rotary layout of these outputs


def _peft_names(model: nn.Module) -> dict[str, tuple[LoRALinear, str, str]]:
    """{peft tensor prefix: (our LoRA layer, projection name, layer index)} for every adapter in model."""
    out = {}
    for name, module in lora_modules(model).items():
        parts = name.split(".")  # layers.{i}.attention.wq or layers.{i}.feed_forward.w1
        index, proj = parts[1], parts[-1]
        out[f"base_model.model.model.layers.{index}.{HF_MODULES[proj]}"] = (module, proj, index)
    return out


def save_peft_adapter(model: nn.Module, folder: str | Path, cfg: LoRAConfig, base_model: str = "") -> Path:
    """Write folder/adapter_config.json and folder/adapter_model.safetensors (fp32) from model's adapters."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = {}
    for prefix, (module, proj, _) in _peft_names(model).items():
        b = module.lora_B.detach().float().cpu()
        if proj in ROTARY:
            b = interleaved_to_rotate_half(b, getattr(args, ROTARY[proj]))
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [HF_MODULES[t].split(".")[-1] for t in cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    atomic_write(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2))
    return folder


def peft_config(folder: str | Path) -> LoRAConfig:
    """The LoRAConfig of a peft LoRA folder (wrap the model with apply_lora(model, it) before loading)."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {Path(folder) / 'adapter_config.json'}: {e}") from None
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        raise UserError(f"{folder}: only peft LoRA adapters without bias terms are supported")
    inverse = {v.split(".")[-1]: k for k, v in HF_MODULES.items()}
    unknown = [t for t in config["target_modules"] if t not in inverse]
    if unknown:
        raise UserError(f"{folder}: adapters on {', '.join(unknown)}, which a Llama model does not have")
    chosen = {inverse[t] for t in config["target_modules"]}  # peft stores a set: put it in our order
    targets = tuple(t for t in TARGETS if t in chosen)
    return LoRAConfig(config["r"], float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)), targets)


def load_peft_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Copy a peft LoRA folder's A and B into model, already wrapped with apply_lora(model, peft_config(folder))."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = peft_config(folder)
    try:
        tensors = {k.replace(".default", ""): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    except Exception as e:
        raise UserError(f"cannot read {folder / 'adapter_model.safetensors'}: {e}") from None
    names = _peft_names(model)
    if {f"{prefix}.lora_{m}.weight" for prefix in names for m in "AB"} != set(tensors):
        raise UserError(f"{folder} holds adapters for other projections or layers than this model's LoRA setup")
    with torch.no_grad():
        for prefix, (module, proj, _) in names.items():
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            if a.shape != module.lora_A.shape or b.shape != module.lora_B.shape or module.alpha != cfg.alpha:
                raise UserError(f"{folder}: {prefix} was made with r {a.shape[0]}, alpha {cfg.alpha}; this model's "
                                f"adapters have r {module.r}, alpha {module.alpha}")  # fmt: skip
            if proj in ROTARY:
                b = rotate_half_to_interleaved(b, getattr(model.args, ROTARY[proj]))
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    return cfg


# ---- a run's exports ---------------------------------------------------------------------------------------
def check_formats(formats: tuple[str, ...], gguf_type: str, flag: str = "--export", lora: bool = True, base: str = ""):
    """Refuse at once formats that cannot be written: unknown ones, peft without LoRA, a merge into a quantized
    base, an unknown GGUF type."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"{flag} takes any of {', '.join(EXPORT_FORMATS)}, not {', '.join(unknown)}")
    if "peft" in formats and not lora:
        raise UserError(f"{flag} peft writes a LoRA adapter: it needs --lora True (hf, gguf: the whole model)")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    if {"hf", "gguf"} & set(formats) and base in QUANTIZED:
        raise UserError(f"{flag} hf / gguf need a full-precision base to merge the adapter into, not --base {base}")


def export_run(
    model: nn.Module,
    tokenizer,
    lora: LoRAConfig | None,
    formats: tuple[str, ...],
    run_dir: Path,
    base_model: str,
    gguf_type: str = "f16",
):
    """Write each of formats under run_dir: peft_adapter/, hf/, model.gguf. hf and gguf merge the adapter into
    the weights first (in place: the model is left merged)."""
    if "peft" in formats:
        save_peft_adapter(model, run_dir / "peft_adapter", lora, base_model=base_model)
        log(f"peft adapter written to {run_dir / 'peft_adapter'} (PeftModel.from_pretrained loads it)")
    if {"hf", "gguf"} & set(formats) and lora:
        merge_lora(model)
    if "hf" in formats:
        save_hf_folder(model, tokenizer, run_dir / "hf")
        log(f"merged model written to {run_dir / 'hf'} (AutoModelForCausalLM.from_pretrained and --ckpt_dir load it)")
    if "gguf" in formats:
        save_gguf(model, tokenizer, run_dir / "model.gguf", gguf_type)
        log(f"merged model written to {run_dir / 'model.gguf'} ({gguf_type}; llama.cpp and --ckpt_dir load it)")


def main(
    run_dir: str = "runs/finetune",
    formats: str = "hf,gguf",
    ckpt_dir: str | None = None,
    shape: str | None = None,
    seed: int = 0,
    gguf_type: str = "f16",
):
    """Export a finished run: its adapter.pt on the base model it was trained on (--ckpt_dir / --shape, as given
    to finetuning.py, with its --seed for a random --shape; default the embedded model), or the full fine-tune
    it saved in run_dir/model."""
    run_path = Path(run_dir)
    wanted = name_list(formats)
    if not wanted:
        raise UserError(f"--formats takes any of {', '.join(EXPORT_FORMATS)}")
    check_formats(wanted, gguf_type, "--formats")
    adapter, full = run_path / "adapter.pt", run_path / "model"
    if not adapter.exists() and not full.exists():
        raise UserError(f"{run_path} has neither adapter.pt (LoRA run) nor model/ (full fine-tune): nothing to export")
    writable_dir(run_dir, "--run_dir")
    if adapter.exists():
        source = ModelSource(ckpt_dir, shape, seed)
        model, tokenizer = source.load(torch.float32, torch.device("cpu"))
        cfg = adapter_config(adapter)
        load_adapter(apply_lora(model, cfg), adapter)
    else:
        if "peft" in wanted:
            raise UserError(f"{run_path} is a full fine-tune: there is no adapter to write in peft's format")
        source, cfg = ModelSource(str(full), None), None
        model, tokenizer = source.load(torch.float32, torch.device("cpu"))
    export_run(model, tokenizer, cfg, wanted, run_path, source.name, gguf_type)


if __name__ == "__main__":
    run(main)
