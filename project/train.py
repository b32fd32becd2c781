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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from llama.checkpoint import atomic_write, load_torch_file
from llama.errors import UserError
from llama.runtime import DTYPES, log

from .cli import uninterrupted
from .data import IGNORE_INDEX, Dataset, collate
from .distributed import (
    SINGLE,
    STATE_DIR,
    Ranks,
    all_sum,
    full_norm,
    gradient_sync,
    load_state,
    rank_slice,
    read_meta,
    save_state,
    unwrapped,
)
from .loss import TiedLookup, linear_cross_entropy
from .memory import memory_in_use, storage_bytes

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


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
    lr_schedule: str = "constant"  # after warm-up: constant, cosine or linear decay to 0 at the last step
    warmup_steps: int = 0  # optimizer steps of linear warm-up from lr / (warmup_steps + 1) to lr
    eval_every: int = 10  # optimizer steps between held-out evaluations (also before the first and after the last)

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
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.eval_every < 1:
            raise UserError("--warmup_steps must be 0 or more and --eval_every at least 1")


def lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (1-based) of n_steps: linear warm-up, then the schedule."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # Decay from lr at the first step after warm-up to 0 after the last (so the last step still moves).
    done = (step - cfg.warmup_steps - 1) / max(1, n_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - done)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))


# ---- loss and one optimizer step -----------------------------------------------------------------------
def label_tokens(labels: torch.Tensor) -> int:
    """How many positions the loss counts: labels (B, T) shifted by one, minus the ignored ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: position t (B, T-1) predicts the label at t+1; -100 labels skipped.

    Only positions with a label go through the output projection (project/loss.py): the prompt's logits
    are never computed. A trained weight tied between the embeddings and the output projection (Llama 3.2's)
    gets both of its gradients through one node (TiedLookup), so that they are summed in place.
    """
    weight = model.output.weight
    if weight is model.tok_embeddings.weight and weight.requires_grad and torch.is_grad_enabled():
        embeddings, weight = TiedLookup.apply(weight, input_ids)
        h = model(input_ids, hidden=True, embeddings=embeddings)
    else:
        h = model(input_ids, hidden=True)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return linear_cross_entropy(h[:, :-1][keep], weight, targets[keep])  # h (B, T-1, D): t predicts t+1


class NextTokenLoss(nn.Module):
    """The model with its training loss as forward: (input_ids, labels) (B, T) -> summed loss. The unit DDP and
    FSDP wrap, since the output projection is used inside the loss, outside the model's own forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_sum(self.model, input_ids, labels)


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
    grad_bytes: int = 0  # gradients this rank held before the update (its shards under FSDP)


def train_step(
    net: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    grad_clip: Optional[float] = None,
    ranks: Ranks = SINGLE,
) -> StepResult:
    """One optimizer step over micro_batches [(input_ids (B, T), labels (B, T)), ...] already on the device.

    net: NextTokenLoss(model), or DDP / FSDP around it (then micro_batches are this rank's share of the window,
    and the loss, label and token counts are those of the whole window)."""
    n_labels = int(all_sum(sum(label_tokens(labels) for _, labels in micro_batches), ranks))
    total = 0.0
    for i, (input_ids, labels) in enumerate(micro_batches):
        with gradient_sync(net, ranks, sync=i == len(micro_batches) - 1):  # once per step, at the last
            total += micro_batch_backward(net, input_ids, labels, n_labels, scaler, precision, ranks.world)
    grad_bytes = storage_bytes(p.grad for group in optimizer.param_groups for p in group["params"])
    skipped, grad_norm, scale = optimizer_update(optimizer, scaler, grad_clip)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) + _prompt_tokens(labels) for _, labels in micro_batches)
    total, tokens = all_sum(total, ranks), int(all_sum(tokens, ranks))
    return StepResult(total, n_labels, tokens, skipped, grad_norm, scale, grad_bytes)


def micro_batch_backward(
    net: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    n_labels: int,
    scaler: torch.amp.GradScaler,
    precision: str,
    world: int = 1,
) -> float:
    """Forward and backward of one micro-batch (B, T) through net (a NextTokenLoss, maybe wrapped); adds its
    gradients to .grad, returns its loss share."""
    with autocast(input_ids.device, precision):
        summed = net(input_ids, labels)
    # Divide by the label tokens of the whole accumulation window (n_labels), not of this micro-batch:
    # the summed gradients are then those of the mean loss over every label token of the window, i.e.
    # exactly the gradient of one batch holding all the window's examples (per-micro-batch means
    # would over-weight the tokens of short examples). DDP and FSDP average over the `world` ranks' gradients
    # where the window's gradient is their sum: multiplying by world undoes that.
    loss = summed / n_labels
    scaler.scale(loss * world if world > 1 else loss).backward()
    return loss.item()


def optimizer_update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: Optional[float] = None
) -> tuple[bool, Optional[float], float]:
    """Apply the accumulated gradients and clear them. Returns (skipped, grad_norm, loss scale used)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = None
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = full_norm(nn.utils.clip_grad_norm_(params, grad_clip))
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


# ---- held-out evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net: nn.Module, dataset: Dataset, pad_id: int, device: torch.device, cfg: TrainConfig) -> dict:
    """Held-out loss: the mean next-token cross-entropy over every label token of dataset (dropout off),
    and its perplexity exp(loss). net: a NextTokenLoss, maybe wrapped (every rank then evaluates all of
    dataset). The model is left in the mode it was in."""
    was_training = net.training
    net.eval()
    total, n_labels = 0.0, 0
    for i in range(0, len(dataset), cfg.batch_size):
        input_ids, labels = (t.to(device) for t in collate(dataset.examples[i : i + cfg.batch_size], pad_id))
        with autocast(device, cfg.precision):
            total += float(net(input_ids, labels))
        n_labels += label_tokens(labels)
    net.train(was_training)
    loss = total / n_labels
    return {"loss": loss, "perplexity": math.exp(loss), "label_tokens": n_labels}


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


def check_settings(saved: dict, cfg: TrainConfig, path: Path):
    """Refuse to resume a checkpoint made with settings that change what the remaining steps do."""
    now, defaults = asdict(cfg), asdict(TrainConfig())  # checkpoints older than a setting hold its default
    keys = ("lr", "optimizer", "batch_size", "grad_accum", "precision", "seed", "lr_schedule", "warmup_steps")
    differs = [k for k in keys if saved.get(k, defaults[k]) != now[k]]
    if differs:
        raise UserError(
            f"--resume: {path} was made with other settings "
            f"({', '.join(f'{k}={saved.get(k, defaults[k])}' for k in differs)}); "
            "rerun with the same flags, or without --resume to start again"
        )


def load_training_state(path: Path, model, optimizer, scaler, cfg: TrainConfig) -> int:
    """Restore a checkpoint written by save_training_state; returns the optimizer steps already done."""
    keys = ("step", "config", "trainable", "optimizer", "scaler", "rng_cpu", "rng_cuda")
    state = load_torch_file(path, "the training state to resume from,", keys)
    check_settings(state["config"], cfg, path)
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


def eval_log_path(log_path: Path) -> Path:
    """Where train() writes the held-out evaluations beside the step log: one JSON line per evaluation."""
    return log_path.with_name("eval_log.jsonl")


def keep_logged(path: Path, step: int) -> list[dict]:
    """Cut a log back to the steps the weights have seen (an interrupted run may have logged more)."""
    kept = [r for r in read_log(path) if r["step"] <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def train(
    net: nn.Module,
    dataset: Dataset,
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    log_path: Path,
    checkpoint_path: Path,
    resume: bool = False,
    step_fn: Callable = train_step,
    heldout: Optional[Dataset] = None,
    ranks: Ranks = SINGLE,
) -> list[dict]:
    """Train net (NextTokenLoss(model), or DDP / FSDP around it) in place; one JSON line per optimizer step in
    log_path. Returns the log records of this run.

    With heldout, its loss is measured before the first step, every cfg.eval_every steps and after the last,
    into eval_log_path(log_path). Under ranks, cfg.grad_accum is per rank: the windows are those of one process
    accumulating ranks.world times as many micro-batches, the checkpoint is the folder `STATE_DIR` beside
    checkpoint_path, and only rank 0 logs.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    optimizer = make_optimizer(params, cfg)
    scaler = make_scaler(device, cfg.precision)
    window_cfg = replace(cfg, grad_accum=cfg.grad_accum * ranks.world)  # what one optimizer step consumes
    n_total = total_steps(len(dataset), window_cfg)
    per_epoch = steps_per_epoch(len(dataset), window_cfg)
    state_dir = checkpoint_path.with_name(STATE_DIR)

    def save(step):
        with uninterrupted():  # a kill mid-save (DCP's collectives included) lands once the checkpoint is whole
            if ranks.on:
                save_state(state_dir, net, optimizer, scaler, {"step": step, "config": asdict(window_cfg)}, ranks)
            else:
                save_training_state(checkpoint_path, unwrapped(net).model, optimizer, scaler, cfg, step)

    step = 0
    if resume:
        if ranks.on:
            check_settings(read_meta(state_dir)["config"], window_cfg, state_dir)
            step = load_state(state_dir, net, optimizer, scaler, ranks)["step"]
        else:
            if not checkpoint_path.exists():
                raise UserError(f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start")
            step = load_training_state(checkpoint_path, unwrapped(net).model, optimizer, scaler, cfg)
        if ranks.main:
            log(f"resuming from {state_dir if ranks.on else checkpoint_path} after optimizer step {step} of {n_total}")
    evals = []
    if ranks.main:
        keep_logged(log_path, step)
        evals = keep_logged(eval_log_path(log_path), step) if heldout else []
    eval_postfix = {"heldout": f"{evals[-1]['loss']:.4f}"} if evals else {}

    def evaluate_now(bar):
        result = evaluate(net, heldout, pad_id, device, cfg)
        if ranks.main:
            with open(eval_log_path(log_path), "a") as f:
                f.write(json.dumps({"step": step, **result}) + "\n")
            eval_postfix["heldout"] = f"{result['loss']:.4f}"
            bar.write(f"step {step}: held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")

    net.train()
    records = []
    start = time.perf_counter()
    bar = tqdm(total=n_total, initial=step, desc="fine-tuning", unit="step", dynamic_ncols=True, disable=not ranks.main)
    log_file = open(log_path, "a") if ranks.main else contextlib.nullcontext()
    with bar, log_file:  # the bar is closed before an error or "interrupted" is printed
        if heldout and step == 0:
            evaluate_now(bar)
        while step < n_total:
            epoch, index = divmod(step, per_epoch)
            window = epoch_windows(len(dataset), window_cfg, epoch)[index]
            mine = rank_slice(window, ranks, cfg.grad_accum)
            batches = [tuple(t.to(device) for t in collate([dataset.examples[i] for i in m], pad_id)) for m in mine]
            # A short last window leaves some ranks fewer micro-batches; every rank must run as many forward and
            # backward passes (FSDP gathers weights in each), so they make up the count with label-free ones.
            short = min(cfg.grad_accum, len(window)) - len(batches)
            if short:
                blank = torch.full((1, 2), pad_id, device=device), torch.full((1, 2), IGNORE_INDEX, device=device)
                batches += [blank] * short
            lr = lr_at(step + 1, n_total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            result = step_fn(net, batches, optimizer, scaler, cfg.precision, cfg.grad_clip, ranks)
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
                "lr": lr,
                "skipped": result.skipped,
                "grad_norm": result.grad_norm,
                "loss_scale": result.scale,
                "memory_bytes": memory_in_use(device),
                "elapsed_s": round(time.perf_counter() - start, 3),
                # what rank 0 holds: FSDP shards parameters and gradients over the ranks
                **(
                    {
                        "ranks": ranks.world,
                        "param_bytes": storage_bytes(net.parameters()),
                        "grad_bytes": result.grad_bytes,
                    }
                    if ranks.on
                    else {}
                ),
            }
            records.append(record)
            if ranks.main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['memory_bytes'] / 2**30:.2f}GiB",
                **eval_postfix,
                **({"skipped": "yes"} if result.skipped else {}),
            )
            if heldout and (step % cfg.eval_every == 0 or step == n_total):
                evaluate_now(bar)
            if step % cfg.save_every == 0 or step == n_total:
                save(step)
    net.eval()
    return records
