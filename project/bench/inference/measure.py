"""Timing and peak memory of repeated generate calls, measured inside the benchmark's subprocess."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from llama.runtime import synchronize
from project.memory import PeakMemory, memory_in_use


def settled_memory(device: torch.device) -> int:
    """Bytes held now, after collecting garbage (see project.memory.memory_in_use)."""
    gc.collect()
    return memory_in_use(device)


# On CPU a warm-up runs the prefill and one decode step: every kernel and buffer gets created. On a GPU it runs the
# whole generation: each new attention length sets up kernels of its own there (on an H200 with torch 2.11 the first
# 32-token run of the 1B shape took ~1.4 s longer than the next, ours and transformers' alike, after 2-token warm-ups).
WARMUP_TOKENS = 2


def measure(
    generate_once: Callable[[int], dict], device: torch.device, warmup: int, repeats: int, n_new: int
) -> list[dict]:
    """Call generate_once(WARMUP_TOKENS on CPU, else n_new) warmup times, then generate_once(n_new) repeats
    times; return, for each measured call, its dict plus
    wall_s (synchronised before and after), peak_bytes (CUDA: max allocated; CPU: peak RSS, reset just
    before the call where the OS allows it), peak_reserved_bytes (CUDA allocator's reserve) and peak_reset."""
    runs, warm_tokens = [], min(n_new, WARMUP_TOKENS) if device.type == "cpu" else n_new
    for i in range(warmup + repeats):
        gc.collect()
        with PeakMemory(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            result = generate_once(n_new if i >= warmup else warm_tokens)
            synchronize(device)
            wall = time.perf_counter() - start
        if i >= warmup:
            runs.append(
                dict(
                    result,
                    repeat=i - warmup,
                    wall_s=wall,
                    peak_bytes=peak.peak,
                    peak_reserved_bytes=peak.reserved,
                    peak_reset=peak.reset_ok,
                )
            )
    return runs
