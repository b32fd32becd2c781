"""Peak memory and runtime of generation with and without the KV cache (Table 1), on any model and device.

    python benchmark_inference.py                                   # Table 1: default model, prompt 256, 32 new
    python benchmark_inference.py --batch_sizes 1 --input_lens 16 --output_lens 32,64,128,256 --repeats 1 --out reports/inference_output_len
    python benchmark_inference.py --compare hf --batch_sizes 1,16   # also run transformers' generate
    python benchmark_inference.py --shape llama3.2-1b --dtype bf16 --compare hf --batch_sizes 1,16

Each configuration runs in a fresh subprocess; results.csv, summary.csv, report.md and plots go to --out.
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from llama.checkpoint import atomic_write, load_checkpoint, random_model, save_hf
from llama.errors import UserError
from llama.runtime import DTYPE_NAMES, log, resolve_device, resolve_dtype
from project.bench import results
from project.bench.config import grid, int_list
from project.bench.hf import hf_source
from project.bench.runner import run_all
from project.cli import run
from project.provenance import git_commit


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def convert_for_hf(ckpt_dir, shape, dtype, device, seed, out_dir: Path) -> str:
    """Write our weights (a random shape or a Meta checkpoint) in Hugging Face layout for transformers."""
    model, _ = random_model(shape, dtype, device, seed) if shape else load_checkpoint(ckpt_dir, dtype, device)
    save_hf(model.cpu(), out_dir)
    del model
    gc.collect()
    return str(out_dir)


def hf_loadable(ckpt_dir) -> bool:
    try:
        hf_source(ckpt_dir)
        return True
    except UserError:
        return False


def main(
    batch_sizes=(1, 8, 16),
    input_lens=(256,),
    output_lens=(32,),
    kv: str = "both",
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    out: str = "reports/inference",
    compare: Optional[str] = None,
    threads: Optional[int] = None,
    seed: int = 0,
):
    """Sweep batch_sizes × input_lens × output_lens × KV cache (on/off/both), each in a fresh process.

    --compare hf also runs Hugging Face transformers' generate on the same weights and prompt ids.
    --threads defaults to PyTorch's default for this machine; it is the same for every configuration."""
    if ckpt_dir and shape:
        raise UserError("give --ckpt_dir or --shape, not both")
    if compare not in (None, "hf"):
        raise UserError(f"--compare only knows 'hf' (got {compare!r})")
    if int(repeats) < 1 or int(warmup) < 0:
        raise UserError("--repeats must be at least 1 and --warmup at least 0")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    threads = int(threads or torch.get_num_threads())
    engines = ["ours", "hf"] if compare else ["ours"]
    tf_version = ""
    if compare:
        try:
            tf_version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            raise UserError("--compare hf needs transformers: pip install -r requirements-dev.txt") from None
    out_dir = Path(out).expanduser()
    out_dir = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("vs_batch_size.png", "vs_output_len.png"):
        (out_dir / stale).unlink(missing_ok=True)

    model_name = (f"{shape} (random weights, seed {seed})" if shape
                  else str(ckpt_dir) if ckpt_dir else "SmolLM2-135M-Instruct (default; GGUF Q4_1, dequantised)")  # fmt: skip
    meta = {
        "model": model_name, "device": str(dev), "dtype": DTYPE_NAMES[dt], "threads": threads,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch_version": torch.__version__, "transformers_version": tf_version, "commit": git_commit(),
        "command": "python benchmark_inference.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "repeats": int(repeats), "warmup": int(warmup),
        "memory_note": "CUDA max_memory_allocated after a reset (max_memory_reserved in summary.csv), above weights = "
        "minus what was allocated after loading" if dev.type == "cuda" else "the process's peak resident memory "
        "(VmHWM, reset before each generate call), above weights = minus the resident memory after loading "
        "(weights + Python + PyTorch)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        hf_dir = None
        if compare and (shape or not hf_loadable(ckpt_dir)):
            log("converting the weights to Hugging Face layout for transformers ...")
            hf_dir = convert_for_hf(ckpt_dir, shape, dt, "cpu", seed, Path(tmp) / "hf")
        jobs = grid(
            int_list(batch_sizes, "batch_sizes"), int_list(input_lens, "input_lens"), int_list(output_lens, "output_lens"),
            str(kv), engines, device=str(dev), dtype=DTYPE_NAMES[dt], threads=threads, repeats=int(repeats),
            warmup=int(warmup), ckpt_dir=str(ckpt_dir) if ckpt_dir else None, shape=shape, seed=int(seed), hf_dir=hf_dir,
        )  # fmt: skip
        log(f"{len(jobs)} configurations of {model_name} on {meta['device']} ({meta['device_name']}), "
            f"{meta['dtype']}, {threads} threads; results in {out_dir}")  # fmt: skip

        def save(done):
            results.write_csv(pd.DataFrame(results.rows(done, meta), columns=results.CSV_COLUMNS), out_dir / "results.csv")

        done = run_all(jobs, Path(tmp), on_result=save)
    if all(res["status"] == "error" for _, res in done):
        raise UserError(f"every configuration failed; the first said: {done[0][1].get('message', '?')}")
    df = pd.read_csv(out_dir / "results.csv", keep_default_na=True)
    summary = results.summarize(df)
    results.write_csv(summary, out_dir / "summary.csv")
    plots = results.plots(summary, out_dir)
    text = results.report(summary, meta, plots)
    atomic_write(out_dir / "report.md", lambda f: f.write(text.encode()))
    print(text)


if __name__ == "__main__":
    run(main)
