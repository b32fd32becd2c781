"""Fine-tuning benchmark: time and memory of every technique combination, each in its own process.

    python benchmark_finetuning.py                      # Llama 3.2-1B shape, random weights, all 10 configurations
    python benchmark_finetuning.py --compare hf         # also Hugging Face transformers + peft, side by side
    python benchmark_finetuning.py --configs vanilla,lora --examples 1    # a quick look
    python benchmark_finetuning.py --nproc 2 --configs vanilla,lora     # also DDP and FSDP over 2 processes
    python benchmark_finetuning.py --report_only        # rebuild tables and plots from the CSV

Writes under --out: measurements.csv (one row per configuration and stack), README.md (Table 3, Table 2,
the memory breakdown), peak_and_time.png, memory_breakdown.png, timeline.png (+ timeline_*.json).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import ModelSource
from llama.errors import UserError
from llama.runtime import log, resolve_device
from project.bench.finetune.configs import ALL_ON, VANILLA, select
from project.bench.finetune.report import write_report
from project.bench.finetune.sweep import SweepOptions, run_sweep
from project.bench.harness import git_commit, measure_limits, staged_output
from project.cli import name_list, run, writable_dir
from project.distributed import MODES
from project.model.lora import LoRAConfig

CSV_NAME = "measurements.csv"


def main(
    configs: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    data: Optional[str] = None,
    examples: int = 2,
    passes: int = 1,
    warmup: int = 1,
    grad_accum: int = 8,
    max_seq_len: int = 512,
    lora_r: int = LoRAConfig.r,
    lora_alpha: float = LoRAConfig.alpha,
    lora_dropout: float = LoRAConfig.dropout,
    lora_targets: Sequence[str] = LoRAConfig.targets,
    optimizer: str = "sgd",
    lr: float = 1e-5,
    allocator: str = "tuned",
    compare: Optional[str] = None,
    nproc: int = 1,
    distributed: Sequence[str] = MODES,
    timelines: Sequence[str] = (VANILLA.name, ALL_ON.name),
    device: str = "auto",
    seed: int = 0,
    timeout_s: Optional[float] = None,
    emulated_amp: bool = False,
    simulate_oom: Sequence[str] = (),
    out: str = "reports/finetune_benchmark",
    run_dir: str = "runs/finetune_benchmark",
    report_only: bool = False,
    limits: bool = False,
):
    """Measure the configurations (default: all 13) and write the report.

    ckpt_dir / shape: the weights (default: the Llama 3.2-1B shape with random weights).
    configs: comma-separated names (vanilla, ckpt, amp, lora, ckpt+amp, ..., accum8, ckpt+amp+lora+accum8).
    examples / passes: the fixed set is the first `examples` usable records; each configuration trains
    `passes` times over it (accumulation cycles on until its window is full) after `warmup` untimed
    steps of one micro-batch. allocator: tuned (glibc malloc keeps freed
    memory, Linux CPU; see project/allocator.py), default (glibc's own settings) or inherit (this shell's).
    compare: hf to also run Hugging Face transformers + peft. nproc: with N > 1, also run every configuration
    under torchrun on N processes (N GPUs on CUDA), in each of the --distributed modes (ddp, fsdp); --grad_accum
    is then per rank, as in finetuning.py. timelines: configurations whose step is
    profiled into a memory timeline. timeout_s: seconds a configuration may take (loading included) before
    it is recorded as timeout. emulated_amp: also run the mixed-precision configurations on a CPU without
    native bf16/fp16 matmuls (by default they are recorded as skipped there: emulated kernels take many
    minutes per 1B micro-batch). simulate_oom: configurations that fake an out-of-memory error.
    limits: first run ../shared/tools/machine_limits.py (about 30 s) and set each configuration against the
    machine's matmul rate (the report's compute-floor section).
    """
    out_dir = Path(out)
    csv_path = out_dir / CSV_NAME
    if report_only:
        if not csv_path.exists():
            raise UserError(f"--report_only: {csv_path} does not exist; run the benchmark first")
        log(f"wrote {write_report(csv_path, out_dir)}")
        return
    if compare not in (None, "hf"):
        raise UserError(f"--compare takes only hf, not {compare!r}")
    chosen = select(configs, grad_accum)
    modes = check_ranks(nproc, name_list(distributed), resolve_device(device)) if nproc != 1 else ()
    if min(examples, passes) < 1 or warmup < 0:
        raise UserError("--examples and --passes must be at least 1, --warmup at least 0")
    opts = SweepOptions(
        device=resolve_device(device),
        source=ModelSource(ckpt_dir, shape or (None if ckpt_dir else "llama3.2-1b"), seed),
        data=data,
        examples=examples,
        passes=passes,
        warmup=warmup,
        max_seq_len=max_seq_len,
        lora=LoRAConfig(lora_r, lora_alpha, lora_dropout, name_list(lora_targets)),
        optimizer=optimizer,
        lr=lr,
        allocator=allocator,
        compare_hf=compare == "hf",
        nproc=nproc,
        modes=modes,
        simulate_oom=name_list(simulate_oom),
        timelines=name_list(timelines),
        timeout_s=timeout_s,
        emulated_amp=emulated_amp,
        command=shlex.join(["python", *sys.orig_argv[1:]]),
        run_dir=Path(run_dir),
        extra={"commit": git_commit()},
    )
    writable_dir(out_dir, "--out")
    # The run's files go to a fresh folder beside --out that replaces it only once the run has finished, so a
    # failed or interrupted run leaves the previous results (CSV, report, plots, timelines) as they were.
    with staged_output(out_dir) as staging:
        if limits:
            measure_limits(staging)
        frame = run_sweep(chosen, opts, staging, staging / CSV_NAME)
        if not (frame.status == "ok").any():
            first = frame.iloc[0]
            raise UserError(f"no configuration ran; the first ({first.config}) said: {first.get('message', '?')}")
        write_report(staging / CSV_NAME, staging)
    log(f"wrote {csv_path} and {out_dir / 'README.md'}")


def check_ranks(nproc: int, modes: list[str], device) -> tuple[str, ...]:
    """The distributed modes to run, once --nproc and the device are known to allow them."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, not {nproc}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(f"--distributed takes {' and/or '.join(MODES)}, not {','.join(unknown) or 'nothing'}")
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if device.type == "mps":
        raise UserError("--nproc runs one process per GPU or on the CPU; MPS has no multi-process backend here")
    return tuple(modes)


if __name__ == "__main__":
    run(main)
