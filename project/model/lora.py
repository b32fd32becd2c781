"""LoRA (Hu et al., 2021) by hand: y = W x + (alpha / r) * B A dropout(x), with W frozen.

A (r, in) starts Kaiming-uniform and B (out, r) at zero, so a fresh adapter leaves the model unchanged.
The adapter stays fp32 whatever the base weights' dtype; autocast casts it for the matmul.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from llama.checkpoint import atomic_write, load_torch_file
from llama.errors import UserError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise UserError(f"LoRA rank must be at least 1, not {r}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=device))
        # The init nn.Linear uses for its own weight (and peft for A).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + (self.dropout(x) @ a.T @ b.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: what merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold B A into W (fp32 sum, cast back to W's dtype): forward then costs one matmul."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention projections, then the SwiGLU MLP's


@dataclass(frozen=True)
class LoRAConfig:
    """The adapter's settings, defined once and passed whole (CLI -> training -> adapter file -> benchmark)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown:
            raise UserError(
                f"no linear layer named {', '.join(unknown or ['(none)'])}: LoRA targets are wq, wk, wv, wo "
                "(attention) and w1, w2, w3 (MLP)"
            )
        if not (isinstance(self.r, int) and self.r >= 1):
            raise UserError(f"LoRA rank must be at least 1, not {self.r}")
        if not self.alpha > 0:
            raise UserError(f"--lora_alpha must be positive (the adapter is scaled by alpha / r), not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), not {self.dropout}")

    def describe(self) -> str:
        return f"r {self.r}, alpha {self.alpha}, dropout {self.dropout}, targets {', '.join(self.targets)}"


def apply_lora(model: nn.Module, cfg: LoRAConfig = LoRAConfig()) -> nn.Module:
    """Wrap every nn.Linear whose attribute name is in cfg.targets and freeze all other weights."""
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in cfg.targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
                replaced += 1
    if not replaced:
        raise UserError(f"no linear layer named {', '.join(cfg.targets)} in this model")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA A and B matrices (what an adapter file holds)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def save_adapter(model: nn.Module, path: str | Path, cfg: LoRAConfig):
    """Adapter-only weights + the LoRA config (r, alpha, dropout, targets), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {**asdict(cfg), "targets": list(cfg.targets)},
        "state_dict": {k: v.detach().cpu() for k, v in adapter_state_dict(model).items()},
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def adapter_config(path: str | Path) -> LoRAConfig:
    """The settings an adapter file was made with: wrap the model with apply_lora(model, them), then load_adapter."""
    config = load_torch_file(path, "adapter", ("config", "state_dict"))["config"]
    return LoRAConfig(config["r"], config["alpha"], config["dropout"], tuple(config["targets"]))


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Load adapter weights into a model already wrapped with apply_lora (same targets and rank); returns the config."""
    payload = load_torch_file(path, "adapter", ("config", "state_dict"))
    state, expected = payload["state_dict"], adapter_state_dict(model)
    if set(state) != set(expected):
        raise UserError(f"adapter {path} was made for other LoRA targets: {payload['config']}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"adapter {path} tensor {name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name].shape)}: it was made with another rank or model"
            )
    model.load_state_dict(state, strict=False)
    return payload["config"]


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain nn.Linear back (for save_meta / save_hf)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, name, child.base)
    return model
