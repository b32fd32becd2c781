"""The training loop, in plain PyTorch: next-token loss, accumulation, mixed precision, checkpoints, resume.

One optimizer step consumes a window of `grad_accum` micro-batches of `batch_size` examples. The
examples' order in each epoch is a permutation drawn from (seed, epoch), so a resumed run sees the same
windows as an uninterrupted one; the checkpoint also carries the RNG state (LoRA dropout) and the
optimizer and GradScaler states, so resuming reaches the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from llama.checkpoint import atomic_write, load_torch_file
from llama.errors import UserError
from llama.runtime import DTYPES, log

from .data import IGNORE_INDEX, Dataset, collate
from .loss import linear_cross_entropy
from .memory import memory_in_use

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    lr: float = 1e-5
    optimizer: str = "sgd"  # sgd (no momentum) or adamw
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; stops earlier than `epochs` if set
    grad_clip: Optional[float] = None  # max global grad norm
    precision: str = "fp32"  # autocast dtype; weights stay fp32
    seed: int = 0
    save_every: int = 10  # optimizer steps between checkpoints (and one at the end)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)} (or auto), not {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        if min(self.batch_size, self.grad_accum, self.epochs, self.save_every) < 1:
            raise UserError("--batch_size, --grad_accum, --epochs and --save_every must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max_steps must be at least 1")
        if not self.lr > 0:
            raise UserError("--lr must be positive")


# ---- loss and one optimizer step -----------------------------------------------------------------------
def label_tokens(labels: torch.Tensor) -> int:
    """How many positions the loss counts: labels (B, T) shifted by one, minus the ignored ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: position t (B, T-1) predicts the label at t+1; -100 labels skipped.

    Only positions with a label go through the output projection (project/loss.py): the prompt's logits
    are never computed.
    """
    h = model(input_ids, hidden=True)[:, :-1]  # (B, T-1, D)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return linear_cross_entropy(h[keep], model.output.weight, targets[keep])


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling (its gradients underflow below 6e-8); bf16 has fp32's range and does not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over the window's label tokens
    label_tokens: int
    tokens: int  # input tokens processed (padding excluded)
    skipped: bool  # the GradScaler found inf/NaN gradients and skipped the update
    grad_norm: Optional[float] = None
    scale: float = 1.0


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    grad_clip: Optional[float] = None,
) -> StepResult:
    """One optimizer step over micro_batches [(input_ids (B, T), labels (B, T)), ...] already on the device."""
    n_labels = sum(label_tokens(labels) for _, labels in micro_batches)
    total = 0.0
    for input_ids, labels in micro_batches:
        total += micro_batch_backward(model, input_ids, labels, n_labels, scaler, precision)
    skipped, grad_norm, scale = optimizer_update(optimizer, scaler, grad_clip)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) + _prompt_tokens(labels) for _, labels in micro_batches)
    return StepResult(total, n_labels, tokens, skipped, grad_norm, scale)


def micro_batch_backward(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    n_labels: int,
    scaler: torch.amp.GradScaler,
    precision: str,
) -> float:
    """Forward and backward of one micro-batch (B, T); adds its gradients to .grad, returns its loss share."""
    with autocast(input_ids.device, precision):
        summed = loss_sum(model, input_ids, labels)
    # Divide by the label tokens of the whole accumulation window (n_labels), not of this micro-batch:
    # the summed gradients are then those of the mean loss over every label token of the window, i.e.
    # exactly the gradient of one batch holding all the window's examples (per-micro-batch means
    # would over-weight the tokens of short examples).
    loss = summed / n_labels
    scaler.scale(loss).backward()
    return loss.item()


def optimizer_update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: Optional[float] = None
) -> tuple[bool, Optional[float], float]:
    """Apply the accumulated gradients and clear them. Returns (skipped, grad_norm, loss scale used)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = None
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips optimizer.step() if any gradient is inf/NaN
    scaler.update()  # ... and then lowers the scale
    skipped = scaler.is_enabled() and scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm, scale


def _prompt_tokens(labels: torch.Tensor) -> int:
    """Prompt tokens per row: those before the first label (padding sits after the last label)."""
    first = (labels != IGNORE_INDEX).int().argmax(dim=1)
    return int(first.sum())


# ---- data order ------------------------------------------------------------------------------------------
def epoch_windows(n_examples: int, cfg: TrainConfig, epoch: int) -> list[list[list[int]]]:
    """Example indices for each optimizer step of an epoch: windows of grad_accum micro-batches of batch_size.

    The permutation depends only on (seed, epoch), so a resumed run rebuilds the same windows.
    """
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=g).tolist()
    micro = [order[i : i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
    return [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]


def steps_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    return math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    steps = cfg.epochs * steps_per_epoch(n_examples, cfg)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# ---- checkpoints ---------------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_training_state(path: Path, model, optimizer, scaler, cfg: TrainConfig, step: int):
    """Everything resume needs, in one atomically replaced file (adapter weights only when LoRA is on)."""
    state = {
        "step": step,
        "config": asdict(cfg),
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path: Path, model, optimizer, scaler, cfg: TrainConfig) -> int:
    """Restore a checkpoint written by save_training_state; returns the optimizer steps already done."""
    keys = ("step", "config", "trainable", "optimizer", "scaler", "rng_cpu", "rng_cuda")
    state = load_torch_file(path, "the training state to resume from,", keys)
    saved = state["config"]
    differs = [
        k for k in ("lr", "optimizer", "batch_size", "grad_accum", "precision", "seed") if saved[k] != asdict(cfg)[k]
    ]
    if differs:
        raise UserError(
            f"--resume: {path} was made with other settings ({', '.join(f'{k}={saved[k]}' for k in differs)}); "
            "rerun with the same flags, or without --resume to start again"
        )
    params = dict(model.named_parameters())
    if set(state["trainable"]) != {n for n, p in params.items() if p.requires_grad}:
        raise UserError(f"--resume: {path} holds other trainable weights (different --lora settings?)")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


# ---- the loop ----------------------------------------------------------------------------------------------
def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(
    model: nn.Module,
    dataset: Dataset,
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    log_path: Path,
    checkpoint_path: Path,
    resume: bool = False,
    step_fn: Callable = train_step,
) -> list[dict]:
    """Train in place; one JSON line per optimizer step in log_path. Returns the log records of this run."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    optimizer = make_optimizer(params, cfg)
    scaler = make_scaler(device, cfg.precision)
    n_total = total_steps(len(dataset), cfg)
    per_epoch = steps_per_epoch(len(dataset), cfg)
    step = 0
    if resume:
        if not checkpoint_path.exists():
            raise UserError(f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start")
        step = load_training_state(checkpoint_path, model, optimizer, scaler, cfg)
        log(f"resuming from {checkpoint_path} after optimizer step {step} of {n_total}")
    # The log keeps exactly the steps the weights have seen (an interrupted run may have logged more).
    kept = [r for r in read_log(log_path) if r["step"] <= step]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(log_path, "".join(json.dumps(r) + "\n" for r in kept))

    model.train()
    records = []
    start = time.perf_counter()
    bar = tqdm(total=n_total, initial=step, desc="fine-tuning", unit="step", dynamic_ncols=True)
    with bar, open(log_path, "a") as log_file:  # the bar is closed before an error or "interrupted" is printed
        while step < n_total:
            epoch, index = divmod(step, per_epoch)
            window = epoch_windows(len(dataset), cfg, epoch)[index]
            batches = [
                tuple(t.to(device) for t in collate([dataset.examples[i] for i in micro], pad_id)) for micro in window
            ]
            t0 = time.perf_counter()
            result = step_fn(model, batches, optimizer, scaler, cfg.precision, cfg.grad_clip)
            seconds = time.perf_counter() - t0
            step += 1
            record = {
                "step": step,
                "epoch": epoch + (index + 1) / per_epoch,
                "loss": result.loss,
                "label_tokens": result.label_tokens,
                "tokens": result.tokens,
                "step_s": round(seconds, 4),
                "tokens_per_s": round(result.tokens / seconds, 2),
                "lr": cfg.lr,
                "skipped": result.skipped,
                "grad_norm": result.grad_norm,
                "loss_scale": result.scale,
                "memory_bytes": memory_in_use(device),
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            records.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['memory_bytes'] / 2**30:.2f}GiB",
                **({"skipped": "yes"} if result.skipped else {}),
            )
            if step % cfg.save_every == 0 or step == n_total:
                save_training_state(checkpoint_path, model, optimizer, scaler, cfg, step)
    model.eval()
    return records
