"""One benchmark configuration, measured in a fresh process (so no peak leaks from another configuration).

    python -m project.bench.finetune.child SPEC.json RESULT.json   (run by project.bench.harness.run_child)

The step is project/train.py's own (`micro_batch_backward` per micro-batch, `optimizer_update` per window),
on a model set up as finetuning.py sets it up. Timing starts after the weights are loaded and after the
warm-up steps. Memory is measured by what holds it:

    parameters, gradients, optimizer state   bytes of those tensors (project.memory, de-duplicated by storage;
                                             parameters include buffers: a quantized base's weights are buffers)
    activations                              bytes autograd saves for backward inside the model's forward
    logits / loss buffers                    the logits tensor + what the loss saves after the model returns
                                             (ours has no logits tensor: project/loss.py computes them a
                                             chunk at a time and keeps none; what it saves is counted)

Each part is its largest value over the measured micro-batches. The meters are passive
saved-tensor hooks (one Python call per saved tensor), active in every configuration alike.

Under torchrun (spec.distributed ddp or fsdp) every rank measures itself: each optimizer step is a window of
ranks × grad_accum micro-batches, of which a rank trains its own slice, as finetuning.py does. Parts are what
the rank holds (its shards under FSDP); rank 0 gathers every rank's result and writes it.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from llama.checkpoint import ModelSource
from llama.runtime import DTYPES, synchronize
from project.allocator import allocator_settings, release_free_memory
from project.bench.harness import child_main
from project.distributed import SINGLE, Ranks, all_sum, gradient_sync, rank_device, rank_slice, setup, teardown, wrap
from project.memory import (
    PeakMemory,
    SavedTensorMeter,
    gradient_bytes,
    memory_timeline,
    optimizer_state_bytes,
    rss_bytes,
    weight_bytes,
)
from project.model.lora import LoRAConfig


@dataclass
class Spec:
    """What the parent process asks one child to measure (sent as JSON)."""

    name: str  # the configuration's name, e.g. "ckpt+amp+lora"
    grad_ckpt: bool  # every block checkpointed, or none
    precision: str  # autocast dtype: fp32 (mixed precision off), bf16, or fp16 (with GradScaler)
    lora: Optional[LoRAConfig]  # None: full fine-tuning
    base: str  # what the weights are held in (project/frozen_base.py, resolved): fp32, bf16, fp16, int8, int4
    grad_accum: int
    device: str
    examples: str  # JSON file: [{"input_ids": [...], "labels": [...]}], the fixed set, in order
    source: ModelSource = ModelSource(shape="llama3.2-1b")
    passes: int = 1  # measured micro-batches = passes x the fixed set
    warmup: int = 1  # optimizer steps of one micro-batch each (the fixed set's first examples), not timed
    hf_dir: Optional[str] = None  # the same weights in Hugging Face layout (hf stack only)
    optimizer: str = "sgd"
    lr: float = 1e-5
    simulate_oom: bool = False  # raise torch.OutOfMemoryError in the first micro-batch (tests the OOM path)
    timeline: Optional[str] = None  # write the memory timeline of one step to this JSON file
    distributed: str = "none"  # ddp or fsdp: one process per rank under torchrun (project/distributed.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        lora = LoRAConfig(**d["lora"]) if d["lora"] else None
        return cls(**{**d, "lora": lora, "source": ModelSource(**d["source"])})


@dataclass
class Stack:
    """A model ready to train and its step functions, whatever library it comes from."""

    model: nn.Module
    # (input_ids, labels, the window's label tokens on all ranks, whether to synchronise gradients) -> loss share
    micro_batch: Callable[[torch.Tensor, torch.Tensor, int, bool], float]
    update: Callable[[], bool]  # optimizer step + zero_grad; True if the GradScaler skipped it
    optimizer: torch.optim.Optimizer
    activation_module: nn.Module  # its forward's saved tensors are "activations"
    logits_module: Optional[nn.Module]  # its output is the logits tensor (B, T, V); None: the loss makes none


class Meters:
    """Forward hooks that meter one micro-batch: saved activations, loss-side buffers, the logits tensor.

    While `activation_module` runs, its own SavedTensorMeter is the innermost saved-tensor hook, so the
    outer meter of `micro_batch()` sees only what is saved outside it (the loss). With `marks`, it also
    notes when the forward starts and when backward reaches the logits (for the timeline plot).
    """

    def __init__(self, stack: Stack):
        self.params = list(stack.model.parameters())
        self.active = False
        self.marks: Optional[list] = None  # [(time_us, phase)] while drawing a timeline
        self.activations = self.loss_side = self.grads = 0
        self._logits_storage, self._logits_bytes = None, 0
        stack.activation_module.register_forward_pre_hook(self._enter)
        stack.activation_module.register_forward_hook(self._exit)
        if stack.logits_module is not None:
            stack.logits_module.register_forward_hook(self._logits)
        self.mark_backward_at = stack.logits_module or stack.activation_module

    def _enter(self, module, args):
        if self.marks is not None:
            self.marks.append((time.time_ns() // 1000, "forward"))
        if self.active:
            self._inner = SavedTensorMeter(exclude=self.params).__enter__()

    def _exit(self, module, args, out):
        if module is self.mark_backward_at:
            self._mark_backward(out)
        if self.active:
            self._inner.__exit__(None, None, None)
            self.activations = max(self.activations, self._inner.bytes)

    def _mark_backward(self, out):
        """Note when backward reaches this module's output (for the timeline plot)."""
        if self.marks is not None and torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda g: self.marks.append((time.time_ns() // 1000, "backward")))

    def _logits(self, module, args, out):
        logits = out if torch.is_tensor(out) else out.logits
        self._mark_backward(logits)
        if self.active:
            self._logits_storage = logits.untyped_storage()
            self._logits_bytes = self._logits_storage.nbytes()

    def micro_batch(self, run: Callable[[], float]) -> float:
        if not self.active:
            return run()
        with SavedTensorMeter(exclude=self.params) as outer:
            loss = run()
        logits = self._logits_storage
        saved = outer.bytes - (self._logits_bytes if logits is not None and logits.data_ptr() in outer.seen else 0)
        self.loss_side = max(self.loss_side, self._logits_bytes + saved)
        self._logits_storage = None
        return loss


def windows_of(
    examples: list[dict], spec: Spec, device, ranks: Ranks = SINGLE
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's measured micro-batches (batch size 1) cut into accumulation windows.

    passes x the fixed set, cycling on through the set until the last window of ranks x grad_accum is full
    (with accumulation 8 and 2 examples: one window, each example 4 times), so every micro-batch is one of the
    same examples; each rank takes its grad_accum-slice of every window.
    """
    per_step = spec.grad_accum * ranks.world
    n = len(examples) * spec.passes
    n = -(-n // per_step) * per_step
    tensors = [
        (torch.tensor([e["input_ids"]], device=device), torch.tensor([e["labels"]], device=device)) for e in examples
    ]
    batches = [tensors[i % len(tensors)] for i in range(n)]
    return [rank_slice(batches[i : i + per_step], ranks, spec.grad_accum) for i in range(0, n, per_step)]


def run_window(
    stack: Stack, meters: Meters, window, device, times: Optional[dict] = None, ranks: Ranks = SINGLE
) -> tuple[float, bool]:
    """One optimizer step; appends micro-batch and update seconds to `times`. Returns (mean loss, skipped)."""
    from project.train import label_tokens

    n_labels = int(all_sum(sum(label_tokens(labels) for _, labels in window), ranks))
    loss = 0.0
    for i, (input_ids, labels) in enumerate(window):
        t0 = time.perf_counter()
        last = i == len(window) - 1
        loss += meters.micro_batch(functools.partial(stack.micro_batch, input_ids, labels, n_labels, last))
        synchronize(device)
        if times is not None:
            times["micro"].append(time.perf_counter() - t0)
        if meters.active:  # gradients held after this backward (accumulated over the window so far)
            meters.grads = max(meters.grads, gradient_bytes(stack.model))
    if meters.marks is not None:
        meters.marks.append((time.time_ns() // 1000, "optimizer"))
    t0 = time.perf_counter()
    skipped = stack.update()
    synchronize(device)
    if times is not None:
        times["update"].append(time.perf_counter() - t0)
    return all_sum(loss, ranks), skipped


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def measure(stack: Stack, spec: Spec, examples: list[dict], device: torch.device, ranks: Ranks = SINGLE) -> dict:
    """Warm up, then time and meter every measured window; optionally record one step's memory timeline."""
    windows = windows_of(examples, spec, device, ranks)
    meters = Meters(stack)
    if spec.simulate_oom:
        stack.micro_batch = _simulated_oom
    idle_rss = rss_bytes()
    idle_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    micro_batches = [b for w in windows for b in w]
    for i in range(spec.warmup):  # one-off costs: first touch of the gradient pages, kernel selection
        run_window(stack, meters, [micro_batches[i % len(micro_batches)]], device, ranks=ranks)

    times = {"micro": [], "update": [], "step": []}
    losses, skipped = [], 0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    meters.active = True
    with PeakMemory(device) as peak:
        for window in windows:
            t0 = time.perf_counter()
            loss, was_skipped = run_window(stack, meters, window, device, times, ranks)
            times["step"].append(time.perf_counter() - t0)
            losses.append(loss)
            skipped += was_skipped
    meters.active = False
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    n_steps = len(windows)
    tokens = sum(ids.numel() for w in windows for ids, _ in w)
    micro, step, update = spread(times["micro"]), spread(times["step"]), spread(times["update"])
    trainable = sum(p.numel() for p in {id(p): p for p in stack.model.parameters()}.values() if p.requires_grad)
    result = {
        "micro_batches": len(times["micro"]),
        "optimizer_steps": n_steps,
        "tokens": tokens,
        "micro_s_mean": micro["mean"],
        "micro_s_std": micro["std"],
        "micro_s_min": micro["min"],
        "micro_s_max": micro["max"],
        "step_s_mean": step["mean"],
        "step_s_std": step["std"],
        "step_s_min": step["min"],
        "step_s_max": step["max"],
        "update_s_mean": update["mean"],
        "tokens_per_s": tokens / sum(times["step"]),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "skipped_steps": skipped,
        "peak_allocated_bytes": peak.allocated,
        "peak_reserved_bytes": peak.reserved,
        "peak_rss_bytes": peak.rss,
        "peak_rss_reset": peak.reset_ok,
        "idle_rss_bytes": idle_rss,
        "idle_allocated_bytes": idle_allocated,
        "peak_bytes": peak.peak,
        "peak_above_idle_bytes": peak.peak - (idle_allocated if device.type == "cuda" else idle_rss),
        "param_bytes": weight_bytes(stack.model),  # parameters and buffers: a quantized base's weights are buffers
        "grad_bytes": meters.grads,
        "optim_bytes": optimizer_state_bytes(stack.optimizer),
        "activation_bytes": meters.activations,
        "logits_loss_bytes": meters.loss_side,
        "trainable_params": trainable,
        "page_faults_per_step": (usage1.ru_minflt - usage0.ru_minflt) / n_steps,
        "sys_s_per_step": (usage1.ru_stime - usage0.ru_stime) / n_steps,
    }
    if spec.timeline:
        write_timeline(stack, meters, windows[0], device, spec.timeline)
    return result


def _simulated_oom(*args):
    raise torch.OutOfMemoryError("simulated out of memory (--simulate_oom)")


def write_timeline(stack: Stack, meters: Meters, window, device, path: str):
    """Live bytes by category through one optimizer step (project.memory.memory_timeline), with phase marks."""
    meters.marks = []
    timeline = memory_timeline(lambda: run_window(stack, meters, window, device), device)
    marks = [((t - timeline["t0_us"]) / 1000, phase) for t, phase in meters.marks]
    meters.marks = None
    Path(path).write_text(json.dumps({**timeline, "marks": marks}))


# ---- this project's stack ----------------------------------------------------------------------------------
def our_stack(spec: Spec, device: torch.device, ranks: Ranks = SINGLE) -> Stack:
    """The model, LoRA, checkpointing, DDP / FSDP, optimizer and GradScaler exactly as finetuning.py sets them up."""
    from project.checkpointing import apply_checkpointing
    from project.frozen_base import load_dtype, prepare
    from project.train import (
        NextTokenLoss,
        TrainConfig,
        make_optimizer,
        make_scaler,
        micro_batch_backward,
        optimizer_update,
    )

    model, _ = spec.source.load(load_dtype(spec.base, spec.precision), device)
    torch.manual_seed(spec.source.seed)
    prepare(model, spec.lora, spec.base, spec.precision)
    apply_checkpointing(model, "all" if spec.grad_ckpt else "none")
    model.train()
    cfg = TrainConfig(lr=spec.lr, optimizer=spec.optimizer, grad_accum=spec.grad_accum, precision=spec.precision)
    net = wrap(NextTokenLoss(model), ranks, DTYPES[spec.precision] if spec.precision != "fp32" else None)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)  # FSDP's shards, if any
    scaler = make_scaler(device, spec.precision)

    def micro_batch(input_ids, labels, n_labels, sync):
        with gradient_sync(net, ranks, sync):
            return micro_batch_backward(net, input_ids, labels, n_labels, scaler, spec.precision, ranks.world)

    return Stack(model, micro_batch, lambda: optimizer_update(optimizer, scaler)[0], optimizer, model, None)


PER_RANK = ("peak_bytes", "param_bytes", "grad_bytes", "optim_bytes", "activation_bytes", "step_s_mean", "micro_s_mean")


def gather_ranks(result: dict, ranks: Ranks) -> dict:
    """Rank 0's result with every rank's peak and parts (lists, in rank order) and the whole job's throughput."""
    every = [None] * ranks.world
    dist.all_gather_object(every, result)
    if not ranks.main:
        return result
    merged = dict(result)
    for key in PER_RANK:
        merged[f"{key}_ranks"] = json.dumps([r[key] for r in every])
    merged["peak_bytes_max"] = max(r["peak_bytes"] for r in every)
    merged["step_s_mean"] = max(r["step_s_mean"] for r in every)  # every rank waits for the slowest at the sync
    merged["tokens"] = sum(r["tokens"] for r in every)
    merged["tokens_per_s"] = sum(r["tokens_per_s"] for r in every)
    return merged


def main(build: Callable[[Spec, torch.device, Ranks], Stack] = our_stack) -> None:
    """The child process (one per rank under torchrun): build the stack, measure it, record the versions of the
    libraries it imported."""

    def run(spec_dict: dict, result: dict):
        spec = Spec.from_dict(spec_dict)
        result["allocator"] = allocator_settings()
        ranks = setup(spec.distributed, torch.device(spec.device))
        device = rank_device(torch.device(spec.device), ranks)
        try:
            examples = json.loads(Path(spec.examples).read_text())
            t0 = time.perf_counter()
            stack = build(spec, device, ranks)
            release_free_memory()  # what either stack's loading freed, so that neither carries it into the peak
            synchronize(device)
            result["load_s"] = time.perf_counter() - t0
            result.update(measure(stack, spec, examples, device, ranks))
            if ranks.on:
                result.update(gather_ranks(result, ranks))
                teardown(ranks)
        finally:
            for library in ("transformers", "peft"):  # the hf stack's versions, where this process imported them
                if library in sys.modules:
                    result[library] = sys.modules[library].__version__

    child_main(run)


if __name__ == "__main__":
    main()
