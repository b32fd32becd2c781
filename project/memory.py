"""Measuring memory by what holds it: parameters, gradients, optimizer state, saved activations, peaks.

Bytes are counted from the tensors themselves, de-duplicated by storage, so that views and shared
(tied) weights are counted once. Process-level peaks come from the OS (CPU) or the CUDA allocator.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Iterable

import torch

MiB = 1 << 20


def local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of t: its shard of a DTensor (FSDP's parameters, gradients, optimizer state)."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind `tensors` (this rank's shards of DTensors), skipping storages whose
    data_ptr is in `exclude`."""
    seen, total = set(exclude), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = local(t).untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {local(t).untyped_storage().data_ptr() for t in tensors if t is not None}


def parameter_bytes(model: torch.nn.Module) -> int:
    return storage_bytes(model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers (a quantized model keeps its weights in buffers), and the weights a kernel holds in
    its own packed form outside PyTorch's tensors (project/quant.py's w8a8 layers on CPU)."""
    packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())
    return storage_bytes([*model.parameters(), *model.buffers()]) + packed


def decode_read_bytes(model: torch.nn.Module) -> int:
    """The weight bytes a decode step reads: all of weight_bytes but the embedding table, of which a step reads one
    row per token, unless the output projection is that table (tied, unquantized). Batch-1 decode's floor is this
    divided by the memory's read rate."""
    table = model.tok_embeddings.weight
    if getattr(model.output, "weight", None) is table:
        return weight_bytes(model)
    return weight_bytes(model) - storage_bytes([table])


def gradient_bytes(model: torch.nn.Module) -> int:
    return storage_bytes(p.grad for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (0 for SGD without momentum)."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


class SavedTensorMeter:
    """Counts the bytes of the tensors autograd saves for backward inside the `with` block.

    Storages are counted once, and storages of `exclude` tensors (the model's parameters, whose bytes are
    already counted as parameters) are skipped, as is any parameter met only now (FSDP's gathered weights,
    freed again after each block's forward). What remains is the activation memory of the step: the
    inputs each op keeps for its backward, including low-precision copies of weights made by autocast.
    Under non-reentrant gradient checkpointing a checkpointed block saves only its inputs here; what it
    recomputes in backward is not held between forward and backward, so it is correctly not counted.

        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(x).sum()
        meter.bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = storage_ptrs(exclude)
        self.seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        if t.device.type != "meta" and t.layout == torch.strided:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.exclude and ptr not in self.seen:
                self.seen.add(ptr)
                self.bytes += s.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


# ---- process-level memory -------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the peak, as the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or since `reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs). False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_in_use(device: torch.device) -> int:
    """Bytes held now: live tensors of the CUDA/MPS allocator, or (CPU) the process's resident memory."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    return rss_bytes()


class PeakMemory:
    """Peak memory over a `with` block, on the device that holds the model.

    CUDA: max_memory_allocated / max_memory_reserved after a reset. CPU: the process's peak RSS (reset
    at entry where the kernel allows it), which includes everything the process holds.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.allocated = self.reserved = self.rss = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset_ok = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        self.rss = peak_rss_bytes()

    @property
    def peak(self) -> int:
        """The headline peak: allocated bytes on CUDA, resident bytes on CPU/MPS."""
        return self.allocated if self.device.type == "cuda" else self.rss


# ---- timeline -------------------------------------------------------------------------------------------------------
# Column order of torch.profiler's exported timeline (after its always-empty first column).
TIMELINE_CATEGORIES = [
    "parameter",
    "optimizer state",
    "input",
    "temporary",
    "activation",
    "gradient",
    "autograd detail",
    "unknown",
]


def memory_timeline(step, device: torch.device) -> dict:
    """Run `step()` once under the PyTorch profiler and return live bytes over time, by category.

    Returns {"t_ms": [...], "categories": [...], "bytes": [[per category] per sample], "t0_us": first sample's
    time in microseconds since the epoch (time.time_ns() // 1000 places other events on t_ms)}. The profiler
    classifies every allocation (parameter, gradient, activation, optimizer state, ...), which RSS cannot.
    """
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a CUDA-only API
        path = os.path.join(tmp, "timeline.json")
        dev = str(device) if torch.device(device).type != "cuda" else f"cuda:{torch.device(device).index or 0}"
        prof.export_memory_timeline(path, device=dev)
        with open(path) as f:
            times, sizes = json.load(f)
    t0 = times[0] if times else 0
    return {
        "t_ms": [(t - t0) / 1000 for t in times],
        "categories": TIMELINE_CATEGORIES,
        "bytes": [s[1:] for s in sizes],
        "t0_us": t0,
    }
