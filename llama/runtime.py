"""Choosing the device and dtype, and saying what was chosen."""
from __future__ import annotations

import sys

import torch

from .errors import UserError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU and says so; an explicit device that is missing is an error."""
    name = str(name).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}: use auto, cpu, cuda or mps")
    return device


def cpu_has_native_bf16() -> bool:
    """True where oneDNN computes bf16 in hardware (AVX-512 BF16 / AMX on x86, BF16 extensions on Arm).

    Elsewhere (e.g. AVX2-only CPUs) bf16 matmuls are emulated and several times slower than fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 where the device computes it natively, else fp16 on GPUs (e.g. a P100) and MPS, fp32 on CPUs."""
    name = str(name).lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        if cpu_has_native_bf16():
            return torch.bfloat16
        log(f"dtype auto: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, using fp32")
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    extra = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"device {device}{extra}, dtype {DTYPE_NAMES[dtype]}{threads}, torch {torch.__version__}"


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)
