"""Peak memory and runtime of generation with and without the KV cache (Table 1), on any model and device.

    python benchmark_inference.py                                   # Table 1: default model, prompt 256, 32 new
    python benchmark_inference.py --batch_sizes 1 --input_lens 16 --output_lens 32,64,128,256 --out DIR
    python benchmark_inference.py --compare hf --batch_sizes 1,16   # also run transformers' generate
    python benchmark_inference.py --shape llama3.2-1b --dtype bf16 --compare hf --batch_sizes 1,16

Each configuration runs in a fresh subprocess; results.csv, summary.csv, report.md and plots go to --out.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from llama.checkpoint import ModelSource, atomic_write
from llama.errors import UserError
from llama.generation import check_compile_mode
from llama.runtime import DTYPE_NAMES, log, resolve_device, resolve_dtype
from project.bench.harness import device_name, git_commit, measure_limits, staged_output
from project.bench.inference import report, results
from project.bench.inference.config import COMPILE_MODES, KV_MODES, grid, int_list
from project.bench.inference.llamacpp import GGUF_FOR, GGUF_FROM_DTYPE, check_installed
from project.bench.inference.quality import run_quality
from project.bench.inference.sweep import baseline_files, run_sweep
from project.cli import name_list, run, writable_dir
from project.quant import QuantConfig


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
    rounds: int = 1,
    out: str = "reports/inference",
    compare: Optional[str] = None,
    threads: Optional[int] = None,
    seed: int = 0,
    quantize="none",
    compile: str = "off",
    compile_mode: str = "default",
    group_size: int = QuantConfig.group_size,
    quantize_output=QuantConfig.output,
    limits: bool = False,
    simulate_oom: str = "",
    timeout_s: Optional[float] = None,
    report_only: bool = False,
):
    """Sweep batch_sizes × input_lens × output_lens × KV cache (on/off/both), each in a fresh process.

    --compare hf also runs Hugging Face transformers' generate on the same weights and prompt ids; --compare
    llamacpp (or hf,llamacpp) llama.cpp through llama-cpp-python on the same weights written as GGUF (batch 1).
    --threads defaults to PyTorch's default for this machine; it is the same for every configuration.
    --quantize none,int8,int4,w8a8 sweeps our stack's weights in those formats (project/quant.py; int4 in
    groups of --group_size input columns; w8a8 also quantizes each token's activations to int8 and multiplies in
    integers); Hugging Face runs once, with the model's own weights. --quantize_output auto,int4 runs each of
    them with the output projection in each of these formats (auto: int8 under int4 blocks, else the blocks' own).
    --compile on decodes with torch.compile's static-shape step (compiled once per configuration, untimed, in
    about 1-2 minutes on 2 CPU cores); both runs every configuration of ours both ways. --compile_mode sets
    torch.compile's mode, or a list of modes each compiled row runs in (default,max-autotune-no-cudagraphs
    compares the two; the second compiles about 4x as long).
    --limits runs ../shared/tools/machine_limits.py first (about 30 s) and sets our figures against them.
    --report_only rebuilds report.md, summary.csv and the plots in --out from its results.csv and meta.json.
    --rounds N runs the whole sweep N times, one round after the other, and takes medians over every round: on a
    shared machine whose speed drifts, a slow spell then lands on all configurations of one round.
    --timeout_s records a configuration still running after that many seconds (loading included) as timeout.
    --simulate_oom batch_size=2,kv_cache=off makes the matching configurations fail as out of memory
    after loading (how the tests check that a sweep survives an OOM)."""
    if report_only:
        folder = Path(out)
        missing = [n for n in ("results.csv", "meta.json") if not (folder / n).exists()]
        if missing:
            raise UserError(f"--report_only: {folder} has no {' or '.join(missing)}; run the benchmark first")
        write_report(folder)
        log(f"wrote {folder / 'report.md'}, summary.csv and the plots from {folder / 'results.csv'}")
        return
    source = ModelSource(ckpt_dir, shape, int(seed))
    others = name_list(compare) if compare else []
    if not set(others) <= {"hf", "llamacpp"}:
        raise UserError(f"--compare takes hf and/or llamacpp (got {compare!r})")
    if timeout_s is not None and not timeout_s > 0:
        raise UserError(f"--timeout_s must be a positive number of seconds, not {timeout_s}")
    if int(repeats) < 1 or int(warmup) < 0 or int(rounds) < 1:
        raise UserError("--repeats and --rounds must be at least 1, --warmup at least 0")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    threads = int(threads or torch.get_num_threads())
    stacks = ["ours", *others]
    sizes = [int_list(v, n) for v, n in ((batch_sizes, "batch_sizes"), (input_lens, "input_lens"),
                                         (output_lens, "output_lens"))]  # fmt: skip
    if str(kv) not in KV_MODES:
        raise UserError(f"--kv must be on, off or both (got {kv!r})")
    compiled = {True: "on", False: "off"}.get(compile, compile)  # a bare --compile is True
    if compiled not in COMPILE_MODES:
        raise UserError(f"--compile must be off, on or both (got {compile!r})")
    compile_modes = name_list(compile_mode)
    for mode in compile_modes:
        check_compile_mode(mode)
    modes = name_list(quantize)
    quants = {}  # one of each format: "none" is the same with any --quantize_output
    for q in (QuantConfig(m, int(group_size), o) for m in modes or ["none"] for o in name_list(quantize_output)):
        quants.setdefault((q.mode, q.output_mode), q)
    quants = list(quants.values())
    tf_version = ""
    if "llamacpp" in others:
        check_installed()
        if dev.type != "cpu":
            raise UserError("--compare llamacpp measures llama-cpp-python's CPU build; use --device cpu")
    if "hf" in others:
        try:
            tf_version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            raise UserError("--compare hf needs transformers: pip install -r requirements-dev.txt") from None
    out_dir = Path(out).expanduser()
    out_dir = writable_dir(out_dir if out_dir.is_absolute() else Path.cwd() / out_dir, "--out")
    # A run's files go to a fresh folder beside --out that replaces it only when the run has finished, so a
    # failed or interrupted run leaves the previous results as they were.
    with staged_output(out_dir) as run_dir:
        meta = {
            "model": source.name,
            "device": str(dev),
            "dtype": DTYPE_NAMES[dt],
            "threads": threads,
            "device_name": device_name(dev),
            "torch_version": torch.__version__,
            "transformers_version": tf_version,
            "llama_cpp_version": importlib.metadata.version("llama_cpp_python") if "llamacpp" in others else "",
            "commit": git_commit(),
            "command": "python benchmark_inference.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "repeats": repeats,
            "warmup": warmup,
            "rounds": int(rounds),
            "memory_note": report.memory_note(dev.type),
        }
        if limits:
            measure_limits(run_dir)  # machine_limits.json, which the report reads
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            hf_dir, ggufs = baseline_files(source, dt, others, modes or ["none"], Path(tmp))
            specs = grid(
                *sizes,
                kv,
                stacks,
                quants,
                compiled,
                compile_modes=compile_modes,
                device=str(dev),
                dtype=DTYPE_NAMES[dt],
                threads=threads,
                repeats=repeats,
                warmup=warmup,
                source=source,
                hf_dir=hf_dir,
            )
            for spec in specs:
                spec.simulate_oom = spec.matches(simulate_oom)
                if spec.stack == "llamacpp":
                    spec.gguf = ggufs[GGUF_FOR[spec.quant.mode] or GGUF_FROM_DTYPE[DTYPE_NAMES[dt]]]
            log(
                f"{len(specs)} configurations ({int(rounds)} round(s)) of {source.name} on {meta['device']} "
                f"({meta['device_name']}), {meta['dtype']}, {threads} threads; results in {run_dir}"
            )

            def save(done):
                frame = pd.DataFrame(results.rows(done, meta), columns=results.CSV_COLUMNS)
                results.write_csv(frame, run_dir / "results.csv")

            done = run_sweep(specs * int(rounds), Path(tmp), on_result=save, timeout_s=timeout_s)
            if any(q.mode != "none" for q in quants) and source.shape:
                log("quality of the weight formats not measured: random weights have no quality to lose")
            elif any(q.mode != "none" for q in quants):
                log("quality of each weight format: perplexity of data/heldout.txt, greedy agreement ...")
                quality = pd.DataFrame(run_quality(source, DTYPE_NAMES[dt], str(dev), quants, Path(tmp)))
                results.write_csv(quality, run_dir / "quality.csv")
        if not any(res["status"] == "ok" for _, res in done):
            first = done[0][1]
            raise UserError(f"no configuration ran; the first was {first['status']}: {first.get('message', '?')}")
        # What our fp32 matmuls went through, as each configuration's process found it (llama/matmul.py).
        meta["cpu_fp32_matmul"] = "; ".join(sorted({res.get("cpu_fp32_matmul") or "" for _, res in done} - {""}))
        atomic_write(run_dir / "meta.json", json.dumps(meta, indent=2))
        print(write_report(run_dir))


def write_report(folder: Path) -> str:
    """summary.csv, the plots and report.md in folder, from its results.csv, meta.json and (where the run made
    them) quality.csv and machine_limits.json; returns the report's text."""
    summary = results.summarize(pd.read_csv(folder / "results.csv", keep_default_na=True))
    results.write_csv(summary, folder / "summary.csv")
    meta = json.loads((folder / "meta.json").read_text())
    quality = pd.read_csv(folder / "quality.csv") if (folder / "quality.csv").exists() else None
    limits = folder / "machine_limits.json"
    machine = json.loads(limits.read_text()) if limits.exists() else None
    text = report.report(summary, meta, report.plots(summary, folder), quality, machine)
    atomic_write(folder / "report.md", text)
    return text


if __name__ == "__main__":
    run(main)
