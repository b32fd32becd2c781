"""Choosing the device and dtype, and saying what was chosen."""

from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
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


def low_precision_dtype(device: torch.device) -> torch.dtype:
    """The device's 16-bit compute dtype: bf16, except fp16 on GPUs without bf16 (e.g. a P100) and on MPS."""
    if device.type == "mps" or (device.type == "cuda" and not cuda_has_bf16(device)):
        return torch.float16
    return torch.bfloat16


def cuda_has_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: NVIDIA compute capability 8.0 (Ampere) and newer, or ROCm.

    Not torch.cuda.is_bf16_supported(): by default it also says yes where bf16 tensors can merely be made,
    e.g. on a P100 (6.0), which has no bf16 arithmetic; it also asks about the current GPU, not `device`."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


# CPU feature flags (Linux /proc/cpuinfo) that mean 16-bit matrix instructions in hardware.
NATIVE_FLAGS = {
    torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},  # x86 AVX-512 BF16 / AMX; Arm's BF16 extension
    torch.float16: {"avx512_fp16", "amx_fp16", "asimdhp"},  # x86 AVX-512 FP16 / AMX-FP16; Arm's FP16 arithmetic
}


def has_native_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the device multiplies matrices of dtype in hardware.

    On CPUs the instructions must be there (NATIVE_FLAGS) and oneDNN must use them. oneDNN's own check alone
    also says yes on AVX-512 CPUs without BF16 instructions, where it converts to fp32: there bf16 matmuls run
    about 3x slower than fp32 (measured on an Intel Xeon with AVX-512, no AVX-512 BF16), and on AVX2-only CPUs
    about 10x."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or cuda_has_bf16(device)
    if device.type == "mps":
        return dtype == torch.float16
    flags = cpu_flags()
    if flags is not None and not flags & NATIVE_FLAGS[dtype]:
        return False
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': the device's 16-bit dtype where it computes it natively (low_precision_dtype), else fp32."""
    name = str(name).lower()
    if name == "auto":
        dtype = low_precision_dtype(device)
        if has_native_matmul(device, dtype):
            return dtype
        log(
            f"dtype auto: this {device.type} ({torch.backends.cpu.get_cpu_capability()}) has no native "
            f"{DTYPE_NAMES[dtype]} matmul, using fp32"
        )
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
