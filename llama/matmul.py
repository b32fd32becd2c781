"""fp32 products with a weight on CPU, through whichever of PyTorch's two CPU GEMM libraries is faster here.

PyTorch sends an fp32 matmul on CPU to its BLAS (MKL in the x86 wheels) and a bf16 one to oneDNN, which has fp32
kernels too. At this project's shapes, activations of few rows against a large weight (a decode step, a
fine-tuning sequence of ~100 tokens), the two can differ by 2x or more, and which one wins depends on the CPU:
on an AMD EPYC with AVX-512 (2 threads, torch 2.13) a (76, 2048) x (2048, 8192) product ran at 0.18 TFLOP/s
through oneDNN against 0.07-0.10 through MKL, and a single row against the same weight read it at 35 GB/s
against 19 (README, "fp32 matmuls on CPU"). Both do fp32 arithmetic with fp32 sums; results differ only in the
order of the sums.

So the first fp32 product on a machine times both on one fixed shape and keeps the faster, and says which
(`cpu_fp32_kernel`). The choice is kept in a small file (~/.cache/efficient_llama/, per CPU and PyTorch version)
and reused by every later run, so that a run and its resumption, or two ranks, never differ in the order of their
sums because one timing came out otherwise; EFFICIENT_LLAMA_FP32_MATMUL=blas or onednn sets it.
`linear` is F.linear (no bias) with that choice, autograd included: the input gradient goes through the same
kernel; a weight's gradient (full fine-tuning), bound by writing the (N, K) result, through torch.mm.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .runtime import cpu_name, log

ENV = "EFFICIENT_LLAMA_FP32_MATMUL"
KERNELS = ("blas", "onednn")
CALIBRATION_SHAPE = (16, 2048, 2048)  # rows, in, out: a few rows against a 1B-sized weight
ONEDNN_MARGIN = 1.1  # oneDNN is kept only where it is clearly faster: the BLAS is what PyTorch itself picks


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) times weight (N, K) transposed -> (..., N), by oneDNN; weight may be a strided view."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, None, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def _onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        _onednn(torch.ones(2, 8), torch.ones(4, 8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def choice_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "efficient_llama" / "cpu_fp32_matmul.json"


def machine_key() -> str:
    return f"{cpu_name()} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def _measure() -> tuple[str, float]:
    """('blas' or 'onednn', oneDNN's speed over the BLAS's) on CALIBRATION_SHAPE, best of 7 runs each."""
    rows, k, n = CALIBRATION_SHAPE
    x, w = torch.full((rows, k), 0.01), torch.full((n, k), 0.01)  # no random draw: the global RNG stays as it was
    kernels = {"blas": lambda: F.linear(x, w), "onednn": lambda: _onednn(x, w)}
    for fn in kernels.values():
        fn()  # first-call setup
    seconds = {name: _best_seconds(fn) for name, fn in kernels.items()}
    ratio = seconds["blas"] / seconds["onednn"]
    return ("onednn" if ratio >= ONEDNN_MARGIN else "blas"), ratio


def _best_seconds(fn, reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _remembered(key: str) -> str | None:
    try:
        choice = json.loads(choice_file().read_text()).get(key, {}).get("kernel")
    except (OSError, ValueError, AttributeError):
        return None
    return choice if choice in KERNELS else None


def _remember(key: str, choice: str, ratio: float):
    from .checkpoint import atomic_write  # here: llama.checkpoint imports the model, which imports this module

    path = choice_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = {"kernel": choice, "onednn_over_blas": round(ratio, 3)}
        atomic_write(path, json.dumps(known, indent=1))  # a reader sees the old file or the new one
    except OSError as e:  # a read-only home: the choice holds for this process only
        log(f"fp32 matmul on CPU: could not keep the choice in {path} ({e})")


_chosen: str | None = None


def cpu_fp32_kernel() -> str:
    """'blas' or 'onednn': the kernel `linear` uses for fp32 on CPU (EFFICIENT_LLAMA_FP32_MATMUL, else the choice
    remembered for this machine, else measured now and remembered)."""
    global _chosen
    if _chosen is None:
        _chosen = _resolve()
    return _chosen


def set_cpu_fp32_kernel(kernel: str):
    """Use kernel from now on in this process (distributed ranks take rank 0's)."""
    global _chosen
    if kernel not in KERNELS:
        raise ValueError(f"unknown fp32 CPU kernel {kernel!r}")
    _chosen = kernel


def requested_kernel() -> str:
    """EFFICIENT_LLAMA_FP32_MATMUL: 'auto' (also when unset), 'blas' or 'onednn'; anything else is a UserError
    (the scripts ask at start, before loading anything)."""
    asked = (os.environ.get(ENV) or "auto").strip().lower()
    if asked not in ("auto", *KERNELS):
        raise UserError(f"{ENV} must be auto, blas or onednn, not {asked!r}")
    return asked


def _resolve() -> str:
    asked = requested_kernel()
    if asked == "blas":
        return asked
    if not _onednn_available():
        if asked == "onednn":
            raise UserError(f"{ENV}=onednn, but this PyTorch has no oneDNN linear kernel for the CPU: use blas or auto")
        return "blas"
    if asked == "onednn":
        return asked
    key = machine_key()
    choice = _remembered(key)
    if choice is None:
        choice, ratio = _measure()
        _remember(key, choice, ratio)
        rows, k, n = CALIBRATION_SHAPE
        log(
            f"fp32 matmul on CPU: {choice} (measured: oneDNN at {ratio:.2f}x the BLAS's speed on a {rows}x{k} by "
            f"{k}x{n} product; kept in {choice_file()}; {ENV}=blas|onednn to choose)"
        )
    return choice


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _onednn(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _onednn(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias: x (..., K), weight (N, K), possibly a transposed view -> (..., N).

    fp32 on CPU (outside autocast and torch.compile) goes through `cpu_fp32_kernel`'s choice; everything else is
    F.linear."""
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and cpu_fp32_kernel() == "onednn"
    ):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _OneDNNLinear.apply(x, weight)
        return _onednn(x, weight)
    return F.linear(x, weight)
