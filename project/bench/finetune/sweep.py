"""Run each configuration in its own fresh process and collect one CSV row per (configuration, stack).

The parent tokenises the fixed set of examples once and hands the same token ids to every child, so
every configuration (and the Hugging Face stack) trains on exactly the same micro-batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from llama.checkpoint import REPO_ROOT, ModelSource, atomic_write, save_hf
from llama.errors import UserError
from llama.runtime import DTYPE_NAMES, has_native_matmul, log, low_precision_dtype
from project.allocator import SETTINGS as TUNED_MALLOC
from project.bench.harness import run_child, status_line
from project.distributed import MODES, fsdp_refusal
from project.frozen_base import resolve_base
from project.model.lora import LoRAConfig

from .child import Spec
from .configs import ALL_ON, VANILLA, BenchConfig

ALLOCATORS = ("tuned", "default", "inherit")
CHILD = {"ours": "project.bench.finetune.child", "hf": "project.bench.finetune.hf_child"}
CHILD.update({mode: CHILD["ours"] for mode in MODES})  # our stack under torchrun: a stack named by its mode


@dataclass
class SweepOptions:
    device: torch.device
    source: ModelSource = ModelSource(shape="llama3.2-1b")
    data: Optional[str] = None
    examples: int = 2  # the fixed set: the first N usable records
    passes: int = 1
    warmup: int = 1
    max_seq_len: int = 512
    lora: LoRAConfig = LoRAConfig()
    optimizer: str = "sgd"
    lr: float = 1e-5
    allocator: str = "tuned"
    compare_hf: bool = False
    nproc: int = 1  # > 1: also run each configuration under torchrun with that many ranks, in each of `modes`
    modes: tuple = ()  # ddp, fsdp
    simulate_oom: tuple = ()  # configuration names whose child raises OutOfMemoryError (tests the OOM path)
    timelines: tuple = (VANILLA.name, ALL_ON.name)
    timeout_s: Optional[float] = None  # per child
    emulated_amp: bool = False  # run mixed precision on CPUs that only emulate its matmuls (else: skipped)
    run_dir: Path = REPO_ROOT / "runs" / "finetune_benchmark"  # each child's spec, result and log
    command: str = ""
    extra: dict = field(default_factory=dict)  # columns copied into every row (commit, ...)


def child_env(allocator: str, device: torch.device) -> dict:
    """The child's environment: tuned glibc malloc (Linux CPU), glibc's defaults, or this one untouched."""
    if allocator not in ALLOCATORS:
        raise UserError(f"--allocator must be one of {', '.join(ALLOCATORS)}, not {allocator!r}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if allocator == "inherit":
        return env
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    if allocator == "tuned" and sys.platform.startswith("linux") and device.type == "cpu":
        env.update(TUNED_MALLOC)
    return env


def prepare_examples(opts: SweepOptions, folder: Path, scratch: Path) -> tuple[Path, Optional[str], str]:
    """Tokenise the fixed set once; save the weights in Hugging Face layout if --compare hf needs them.

    Returns (examples JSON path, hf weights folder or None, a description of the data).
    """
    from llama.checkpoint import load_llama3_tokenizer
    from project.data import build_dataset, find_dataset, load_records, validate_records

    data_path = find_dataset(opts.data)
    records = validate_records(load_records(data_path), "skip")
    model = None
    if opts.source.ckpt_dir:
        model, tokenizer = opts.source.load(torch.float32, "cpu")
    else:
        tokenizer = load_llama3_tokenizer()
    dataset = build_dataset(records, tokenizer, opts.max_seq_len)
    if len(dataset) < opts.examples:
        raise UserError(f"{data_path} has {len(dataset)} usable examples; --examples {opts.examples} needs more")
    chosen = dataset.examples[: opts.examples]
    path = folder / "examples.json"
    path.write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in chosen]))
    lengths = [len(e.input_ids) for e in chosen]
    described = (
        f"the first {len(chosen)} usable records of {data_path.name} ({sum(lengths)} tokens, "
        f"{min(lengths)}-{max(lengths)} per example, {sum(e.truncated for e in chosen)} truncated "
        f"to {opts.max_seq_len})"
    )

    hf_dir = None
    if opts.compare_hf:
        if opts.source.ckpt_dir and (Path(opts.source.ckpt_dir) / "config.json").exists():
            hf_dir = str(Path(opts.source.ckpt_dir).resolve())
        else:
            if model is None:
                model, _ = opts.source.load(torch.float32, "cpu")
            hf_dir = str(scratch / "hf_weights")
            save_hf(model, hf_dir)
    del model
    return path, hf_dir, described


def check_compare_hf():
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--compare hf needs {' and '.join(missing)}: pip install -r requirements-dev.txt")


def run_sweep(configs: list[BenchConfig], opts: SweepOptions, out_dir: Path, csv_path: Path) -> pd.DataFrame:
    """Measure every configuration (and its hf twin with --compare hf); the CSV is rewritten after each row."""
    if opts.compare_hf:
        check_compare_hf()
    env = child_env(opts.allocator, opts.device)
    stacks = ["ours", *opts.modes] + (["hf"] if opts.compare_hf else [])
    amp_dtype = low_precision_dtype(opts.device)
    amp_precision = DTYPE_NAMES[amp_dtype]
    rows = []
    runs = Path(opts.run_dir)
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="finetune_bench_"))  # the hf weights (GBs): removed at the end
    try:
        examples, hf_dir, data_text = prepare_examples(opts, runs, work)
        for config in configs:
            for stack in stacks:
                timeline = config.name in opts.timelines and stack == "ours"
                precision = amp_precision if config.amp else "fp32"
                spec = Spec(
                    name=config.name,
                    grad_ckpt=config.grad_ckpt,
                    precision=precision,
                    lora=opts.lora if config.lora else None,
                    base=resolve_base(config.base, precision, config.lora),
                    grad_accum=config.grad_accum,
                    device=str(opts.device),
                    examples=str(examples),
                    source=opts.source,
                    passes=opts.passes,
                    warmup=opts.warmup,
                    hf_dir=hf_dir,
                    optimizer=opts.optimizer,
                    lr=opts.lr,
                    simulate_oom=config.name in opts.simulate_oom,
                    timeline=str(out_dir / f"timeline_{stack}_{config.name}.json") if timeline else None,
                    distributed=stack if stack in MODES else "none",
                )
                ranks = opts.nproc if stack in MODES else 1
                log(f"[{len(rows) + 1}/{len(configs) * len(stacks)}] {stack} {config.name} ...")
                t0 = time.perf_counter()
                if config.amp and not has_native_matmul(opts.device, amp_dtype) and not opts.emulated_amp:
                    result = {
                        "status": "skipped",
                        f"{amp_precision}_native": False,
                        "message": f"no native {amp_precision} matmul on this CPU: autocast would run emulated "
                        "kernels (a 1B micro-batch took over 9 minutes on one); --emulated_amp runs it anyway",
                    }
                elif stack == "fsdp" and fsdp_refusal(spec.base, spec.precision):
                    result = {"status": "skipped", "message": fsdp_refusal(spec.base, spec.precision)}
                elif stack == "hf" and config.base != "auto":
                    result = {
                        "status": "skipped",
                        "message": "transformers + peft have no counterpart on this device: a quantized base "
                        "needs bitsandbytes (CUDA), and peft computes in the dtype the base is held in",
                    }
                else:
                    result = run_child(
                        CHILD[stack], spec.to_dict(), runs, f"{stack}-{config.name}", env, opts.timeout_s, ranks
                    )
                row = {
                    "config": config.name,
                    "stack": stack,
                    "grad_ckpt": config.grad_ckpt,
                    "amp": config.amp,
                    "lora": config.lora,
                    "grad_accum": config.grad_accum,
                    "precision": spec.precision,
                    "base": spec.base if stack != "hf" else "fp32",
                    "ranks": ranks,
                    "device": str(opts.device),
                    "examples": opts.examples,
                    "passes": opts.passes,
                    "warmup_steps": opts.warmup,
                    "data": data_text,
                    "optimizer": opts.optimizer,
                    "lr": opts.lr,
                    "lora_setup": opts.lora.describe() if config.lora else "",
                    "model": opts.source.name,
                    **result,
                    **opts.extra,
                    "command": opts.command,
                    "wall_s": time.perf_counter() - t0,
                }
                rows.append(row)
                log(f"    {status_line(row, ok_text)}")
                frame = pd.DataFrame(rows)
                atomic_write(csv_path, frame.to_csv(index=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return pd.DataFrame(rows)


def ok_text(row: dict) -> str:
    return (
        f"{row['micro_s_mean']:.3f} s/micro-batch, {row['step_s_mean']:.3f} s/step, "
        f"peak {row['peak_bytes'] / 2**30:.2f} GiB ({row['allocator']})"
    )
