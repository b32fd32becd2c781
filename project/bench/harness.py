"""What both benchmarks share: one configuration per fresh child process, its status, and where it ran.

The parent writes a spec (JSON) and runs `python -m <child module> SPEC.json RESULT.json`; the child
measures and writes RESULT.json. A fresh process per configuration means no peak, allocator cache or
compiled kernel carries over from the previous configuration. Every result has a `status`:

    ok        measured
    OOM       out of memory (raised in the child, or the child was killed by SIGKILL: the OOM killer)
    error     anything else went wrong; `message` says what, the child's log has the traceback
    timeout   the child did not finish within the parent's time limit
    skipped   the parent chose not to run it (e.g. mixed precision on a CPU that only emulates it)

and, unless ok, a one-line `message`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import REPO_ROOT, atomic_write
from llama.errors import UserError
from llama.matmul import cpu_fp32_kernel
from llama.runtime import cpu_name, has_native_matmul, log


def run_child(
    module: str, spec: dict, folder: Path, tag: str, env=None, timeout_s: Optional[float] = None, nproc: int = 1
) -> dict:
    """Run `python -m module` on spec in a fresh process (nproc > 1: that many under torchrun, each with its share
    of the CPU threads); its spec, result and log are folder/tag.*."""
    spec_path, result_path, log_path = (folder / f"{tag}.{kind}" for kind in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    launcher = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // nproc)))
    cmd = [sys.executable, *launcher, "-m", module, str(spec_path), str(result_path)]
    ticks = cpu_ticks()
    with open(log_path, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "message": f"did not finish within {timeout_s:g} s"}
    steal = cpu_steal(ticks, cpu_ticks())
    if result_path.exists():
        result = json.loads(result_path.read_text())
    elif proc.returncode == -signal.SIGKILL:
        result = {"status": "OOM", "message": "killed by SIGKILL (the operating system's out-of-memory killer)"}
    else:
        tail = log_path.read_text().strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        result = {"status": "error", "message": f"child failed: {tail[0]}"}
    if result["status"] == "error":
        log(log_path.read_text().rstrip())
    if steal is not None:
        result["cpu_steal"] = steal
    return result


def child_main(measure: Callable[[dict, dict], None]) -> None:
    """The child's side: measure(spec, result) fills result; failures become a status, never a crash.

    Called as `python -m module SPEC.json RESULT.json`; RESULT.json is written atomically in every case. Under
    torchrun rank 0 writes it, and a failed rank exits with an error so that torchrun stops the others (which
    would otherwise wait for it in a collective)."""
    spec_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"status": "ok", **environment(torch.device(spec["device"]))}
    try:
        measure(spec, result)
    except UserError as e:
        result.update(status="error", message=str(e))
    except Exception as e:  # recorded, so that the sweep goes on; the traceback goes to the child's log
        traceback.print_exc()
        first_line = str(e).splitlines()[0] if str(e) else ""
        result.update(status="OOM" if is_out_of_memory(e) else "error", message=f"{type(e).__name__}: {first_line}")
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write(Path(result_path), json.dumps(result))
    if result["status"] != "ok" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(1)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's "can't allocate memory"."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def status_line(result: dict, ok_text: Callable[[dict], str]) -> str:
    """One log line for a finished configuration: ok_text(result), or its status and message."""
    return ok_text(result) if result["status"] == "ok" else f"{result['status']} ({result.get('message', '')})"


# ---- where and with what it ran -------------------------------------------------------------------------
def cpu_ticks() -> Optional[list[int]]:
    """The machine's CPU time counters (Linux /proc/stat: user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_steal(before: Optional[list[int]], after: Optional[list[int]]) -> Optional[float]:
    """The share of CPU time the hypervisor took for other guests between two cpu_ticks() readings: timings
    taken while it is high are slower than this machine's own speed (a virtual machine's neighbours)."""
    if not before or not after or len(before) < 8:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return spent[7] / sum(spent) if sum(spent) else None


def environment(device: torch.device) -> dict:
    """The facts every result records: device name, threads, versions, native low-precision matmuls, and the
    library fp32 matmuls go through on a CPU (llama/matmul.py)."""
    import numpy

    return {
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "bf16_native": has_native_matmul(device, torch.bfloat16),
        "fp16_native": has_native_matmul(device, torch.float16),
        "cpu_fp32_matmul": cpu_fp32_kernel() if device.type == "cpu" else "",
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and PyTorch's vector capability (e.g. AVX512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    return f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}"


@lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit of the code that ran, with '+changes' when tracked files differ from it ('unknown' outside git)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + (
            "+changes" if git("status", "--porcelain", "--untracked-files=no") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside out_dir (out_dir.partial) for one run's files, which replaces out_dir when the block
    finishes. If the block fails or is interrupted, out_dir stays exactly as it was and the partial files stay
    beside it, in out_dir.partial, for inspection."""
    out_dir = Path(out_dir)
    staging, old = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        log(f"the run did not finish: {out_dir} is unchanged; what it wrote is in {staging}")
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


LIMITS_TOOL = REPO_ROOT.parent / "shared" / "tools" / "machine_limits.py"


def measure_limits(out_dir: Path) -> dict:
    """The machine's limits (memory read rate, matmul rates, Llama 3.2-1B bounds) from the shared tool
    ../shared/tools/machine_limits.py (about 30 s), saved as out_dir/machine_limits.json."""
    if not LIMITS_TOOL.exists():
        raise UserError(f"--limits needs {LIMITS_TOOL} (the shared folder beside the repository)")
    log(f"measuring the machine's limits with {LIMITS_TOOL.name} ...")
    run = subprocess.run([sys.executable, str(LIMITS_TOOL), "--json"], capture_output=True, text=True, check=True)
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    atomic_write(out_dir / "machine_limits.json", json.dumps(facts, indent=2))
    return facts
