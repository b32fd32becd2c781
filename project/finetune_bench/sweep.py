"""Run each configuration in its own fresh process and collect one CSV row per (configuration, stack).

The parent tokenises the fixed set of examples once and hands the same token ids to every child, so
every configuration (and the Hugging Face stack) trains on exactly the same micro-batches.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from llama.checkpoint import REPO_ROOT, atomic_write
from llama.errors import UserError
from llama.runtime import cpu_has_native_bf16, log
from project.allocator import SETTINGS as TUNED_MALLOC

from .child import Spec
from .configs import ALL_ON, VANILLA, BenchConfig

ALLOCATORS = ("tuned", "default", "inherit")
CHILD = {"ours": "project.finetune_bench.child", "hf": "project.finetune_bench.hf_child"}


@dataclass
class SweepOptions:
    device: torch.device
    shape: str = "llama3.2-1b"
    ckpt_dir: Optional[str] = None
    data: Optional[str] = None
    examples: int = 2  # the fixed set: the first N usable records
    passes: int = 1
    warmup: int = 1
    max_seq_len: int = 512
    seed: int = 0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple = ("wq", "wv")
    optimizer: str = "sgd"
    lr: float = 1e-5
    allocator: str = "tuned"
    compare_hf: bool = False
    simulate_oom: tuple = ()  # configuration names whose child raises OutOfMemoryError (tests the OOM path)
    timelines: tuple = (VANILLA.name, ALL_ON.name)
    timeout_s: Optional[float] = None  # per child
    emulated_amp: bool = False  # run mixed precision on CPUs that only emulate its matmuls (else: skipped)
    run_dir: Path = REPO_ROOT / "runs" / "finetune_benchmark"  # each child's spec, result and log
    command: str = ""
    extra: dict = field(default_factory=dict)  # columns copied into every row (commit, ...)


def mixed_precision(device: torch.device) -> str:
    """The autocast dtype of the mixed-precision configurations: fp16 on GPUs without bf16 (e.g. P100), else bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def emulated_on_cpu(device: torch.device, precision: str) -> bool:
    """True on a CPU without native matmuls for `precision`: autocast then falls back to slow reference kernels."""
    if device.type != "cpu":
        return False
    return not (cpu_has_native_bf16() if precision == "bf16" else torch.ops.mkldnn._is_mkldnn_fp16_supported())


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
    from llama.checkpoint import load_checkpoint, load_llama3_tokenizer, random_model, save_hf
    from project.data import build_dataset, find_dataset, load_records, validate_records

    data_path = find_dataset(opts.data)
    records = validate_records(load_records(data_path), "skip")
    model = None
    if opts.ckpt_dir:
        model, tokenizer = load_checkpoint(opts.ckpt_dir, torch.float32, "cpu")
    else:
        tokenizer = load_llama3_tokenizer()
    dataset = build_dataset(records, tokenizer, opts.max_seq_len)
    if len(dataset) < opts.examples:
        raise UserError(f"{data_path} has {len(dataset)} usable examples; --examples {opts.examples} needs more")
    chosen = dataset.examples[: opts.examples]
    path = folder / "examples.json"
    path.write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in chosen]))
    lengths = [len(e.input_ids) for e in chosen]
    described = (f"the first {len(chosen)} usable records of {data_path.name} ({sum(lengths)} tokens, "
                 f"{min(lengths)}-{max(lengths)} per example, {sum(e.truncated for e in chosen)} truncated "
                 f"to {opts.max_seq_len})")  # fmt: skip

    hf_dir = None
    if opts.compare_hf:
        if opts.ckpt_dir and (Path(opts.ckpt_dir) / "config.json").exists():
            hf_dir = str(Path(opts.ckpt_dir).resolve())
        else:
            if model is None:
                model, _ = random_model(opts.shape, torch.float32, "cpu", opts.seed)
            hf_dir = str(scratch / "hf_weights")
            save_hf(model, hf_dir)
    del model
    return path, hf_dir, described


def check_compare_hf():
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--compare hf needs {' and '.join(missing)}: pip install -r requirements-dev.txt")


def run_child(stack: str, spec: Spec, env: dict, folder: Path, timeout_s: Optional[float]) -> dict:
    """Run one child process; a crash, kill or timeout becomes a result with status OOM or error."""
    tag = f"{stack}-{spec.name}"
    spec_path, result_path, log_path = folder / f"{tag}.spec.json", folder / f"{tag}.result.json", folder / f"{tag}.log"
    spec_path.write_text(json.dumps(asdict(spec)))
    cmd = [sys.executable, "-m", CHILD[stack], str(spec_path), str(result_path)]
    with open(log_path, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"did not finish within --timeout_s {timeout_s:g} s"}
    if result_path.exists():
        return json.loads(result_path.read_text())
    if rc == -signal.SIGKILL:
        return {"status": "OOM", "error": "killed by SIGKILL (the operating system's out-of-memory killer)"}
    tail = log_path.read_text().strip().splitlines()[-1:] or [f"exit code {rc}"]
    return {"status": "error", "error": f"child failed: {tail[0]}"}


def run_sweep(configs: list[BenchConfig], opts: SweepOptions, out_dir: Path, csv_path: Path) -> pd.DataFrame:
    """Measure every configuration (and its hf twin with --compare hf); the CSV is rewritten after each row."""
    if opts.compare_hf:
        check_compare_hf()
    env = child_env(opts.allocator, opts.device)
    stacks = ["ours", "hf"] if opts.compare_hf else ["ours"]
    precision = mixed_precision(opts.device)
    rows = []
    runs = Path(opts.run_dir)
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="finetune_bench_"))  # the hf weights (GBs): removed at the end
    try:
        examples, hf_dir, data_text = prepare_examples(opts, runs, work)
        for config in configs:
            for stack in stacks:
                spec = Spec(
                    name=config.name, grad_ckpt=config.grad_ckpt, mixed=config.mixed, lora=config.lora,
                    grad_accum=config.grad_accum, precision=precision if config.mixed else "fp32",
                    device=str(opts.device), examples=str(examples), passes=opts.passes, warmup=opts.warmup,
                    shape=opts.shape, ckpt_dir=opts.ckpt_dir, hf_dir=hf_dir, seed=opts.seed, lora_r=opts.lora_r,
                    lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout, lora_targets=list(opts.lora_targets),
                    optimizer=opts.optimizer, lr=opts.lr, simulate_oom=config.name in opts.simulate_oom,
                    timeline=str(out_dir / f"timeline_{stack}_{config.name}.json")
                    if config.name in opts.timelines and stack == "ours" else None,
                )  # fmt: skip
                log(f"[{len(rows) + 1}/{len(configs) * len(stacks)}] {stack} {config.name} ...")
                t0 = time.perf_counter()
                if config.mixed and emulated_on_cpu(opts.device, precision) and not opts.emulated_amp:
                    result = {"status": "skipped", f"{precision}_native": False, "error": (
                        f"no native {precision} matmul on this CPU: autocast would run emulated kernels (a 1B "
                        "micro-batch took over 9 minutes here); --emulated_amp runs it anyway")}  # fmt: skip
                else:
                    result = run_child(stack, spec, env, runs, opts.timeout_s)
                row = {
                    "config": config.name, "stack": stack, "grad_ckpt": config.grad_ckpt, "mixed_precision": config.mixed,
                    "lora": config.lora, "grad_accum": config.grad_accum, "autocast": spec.precision,
                    "master_weights": "fp32", "device": str(opts.device), "examples": opts.examples,
                    "passes": opts.passes, "warmup_steps": opts.warmup, "data": data_text, "optimizer": opts.optimizer,
                    "lr": opts.lr, "lora_setup": f"r {opts.lora_r}, alpha {opts.lora_alpha}, dropout "
                    f"{opts.lora_dropout}, {'/'.join(opts.lora_targets)}" if config.lora else "",
                    "model": opts.ckpt_dir or f"{opts.shape} (random weights, seed {opts.seed})",
                    **result, **opts.extra, "command": opts.command, "wall_s": time.perf_counter() - t0,
                }  # fmt: skip
                rows.append(row)
                log(f"    {summary_line(row)}")
                frame = pd.DataFrame(rows)
                atomic_write(csv_path, lambda f: f.write(frame.to_csv(index=False).encode()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return pd.DataFrame(rows)


def summary_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    return (f"{row['micro_s_mean']:.3f} s/micro-batch, {row['step_s_mean']:.3f} s/step, peak "
            f"{row['peak_bytes'] / 2**30:.2f} GiB ({row['allocator']})")  # fmt: skip
