"""Keep glibc's malloc from handing freed memory back to the OS between training steps (Linux, CPU).

By default glibc serves large blocks (>= 128 KiB, adaptive up to 32 MiB) with mmap and returns them
with munmap on free, and trims the heap top above 128 KiB. A training step frees and reallocates
gradients and activations of hundreds of MiB every step, so each step pays for zeroed pages to be
faulted in again (on this machine a 1B full fine-tuning step ran 4x slower). These settings make
malloc keep freed memory in the process for reuse:

    MALLOC_MMAP_MAX_=0                   never serve blocks with mmap (so never munmap them)
    MALLOC_TRIM_THRESHOLD_=68719476736   never trim the heap top (64 GiB threshold)
    MALLOC_TOP_PAD_=1073741824           grow the heap 1 GiB at a time

glibc reads them once, at start-up, so the process must be started with them: `retain_freed_memory`
re-executes the current command once with them set.
"""

from __future__ import annotations

import ctypes
import os
import sys

SETTINGS = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
OPT_OUT = "LLAMA_KEEP_ALLOCATOR"  # set to 1 to run with the environment's allocator settings untouched


def retain_freed_memory() -> None:
    """On Linux with glibc, re-exec this process once with SETTINGS unless any MALLOC_* variable is set."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "1":
        return
    if any(k.startswith("MALLOC_") for k in os.environ) or "LD_PRELOAD" in os.environ:
        return  # the user chose the allocator (or a preloaded one, e.g. jemalloc/tcmalloc); respect it
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        return  # musl and others ignore these variables
    env = {**os.environ, **SETTINGS}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator_settings() -> str:
    """What this process runs with, for reports."""
    chosen = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if "LD_PRELOAD" in os.environ:
        chosen["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
    if not chosen:
        return "default allocator settings"
    return " ".join(f"{k}={v}" for k, v in sorted(chosen.items()))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS once (glibc's malloc_trim), e.g. after loading a model.

    The settings above keep freed memory resident for reuse; what a model load or quantization frees (an fp32
    copy of weights now held in 16 or 4 bits) is not reused by training, and would stay in the process's
    resident memory for good.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing is retained beyond the allocator's own policy
