"""Where the reports find their inputs, and which column or key holds what: the one place to adapt.

Each table maps the report's own name (left) to the name used in the results files (right). Files are
looked for under the folder in the order given; the first that exists is read. A missing file or column
makes the report say so, never crash.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

INFERENCE = {
    "dir": "reports/inference",
    "files": ["results.csv", "benchmark.csv", "*.csv"],  # a glob takes the newest match
    "samples": "kv_cache_samples.json",  # sample outputs with and without the cache (made by the builder)
    "command": "python benchmark_inference.py",
    "columns": {
        "batch_size": "batch_size",
        "input_len": "input_len",
        "output_len": "output_len",
        "kv": "kv_cache",
        "status": "status",
        "wall_s": "wall_s",
        "prefill_s": "prefill_s",
        "decode_s": "decode_s",
        "tokens_per_s": "tokens_per_s",
        "peak_mib": "peak_mib",
        "peak_above_weights_mib": "peak_above_weights_mib",
        "kv_cache_bytes": "kv_cache_bytes",
        "device": "device",
        "dtype": "dtype",
        "torch": "torch_version",
        "commit": "commit",
        "model": "model",  # optional
        "runner": "engine",  # optional: ours / hf (--compare hf)
        "command": "command",  # optional
    },
    "required": ["batch_size", "kv", "status", "wall_s", "tokens_per_s", "peak_mib"],
}

FINETUNE = {
    "dir": "reports/finetune",
    "loss_log": ["train_log.jsonl", "loss_log.jsonl", "loss_log.csv", "*.jsonl"],
    "loss_columns": {"step": "step", "loss": "loss", "step_s": "step_s", "tokens_per_s": "tokens_per_s",
                     "skipped": "skipped", "memory_bytes": "memory_bytes"},  # fmt: skip
    "samples": ["samples.json", "samples.jsonl", "before_after.json"],
    "sample_keys": {"prompt": "instruction", "input": "input", "before": "before", "after": "after"},
    # summary.json (a dict), or summary.md whose `- **key**: value` bullets are read as a dict.
    "summary": ["summary.json", "summary.md"],
    "summary_keys": {"trainable": "trainable", "model": "model", "lora": "LoRA", "grad_ckpt": "gradient checkpointing",
                     "precision": "precision", "device": "device", "versions": "versions", "command": "command",
                     "training": "training", "data": "data", "allocator": "allocator"},  # fmt: skip
    # How to read "trainable parameters: 460,800 of 134,975,808 (0.341%)" from the summary's trainable value.
    "trainable_pattern": r"([\d,]+) of ([\d,]+) \(([\d.]+)%\)",
    "command": "python finetuning.py",
}

FINETUNE_BENCH = {
    "dir": "reports/finetune_benchmark",
    "files": ["measurements.csv", "results.csv", "*.csv"],
    "command": "python benchmark_finetuning.py",
    # A technique counts as off when its flag holds one of these values (any case); accumulation over 1 is off.
    "off_values": {
        "default": ["off", "false", "0", "no", "none", "fp32", "float32", "", "nan"],
        "grad_accum": ["off", "false", "0", "1", "no", "none", "", "nan"],
    },
    "columns": {
        "grad_ckpt": "grad_ckpt",
        "mixed_precision": "mixed_precision",
        "lora": "lora",
        "grad_accum": "grad_accum",
        "status": "status",
        "config": "config",  # optional: the configuration's name
        "step_s": "step_s_mean",
        "micro_s": "micro_s_mean",
        "step_s_std": "step_s_std",  # optional spread
        "peak_bytes": "peak_bytes",  # *_bytes columns also give the *_mib ones
        "peak_above_baseline_bytes": "peak_above_idle_bytes",
        "param_bytes": "param_bytes",
        "grad_bytes": "grad_bytes",
        "optim_bytes": "optim_bytes",
        "activation_bytes": "activation_bytes",
        "logits_loss_bytes": "logits_loss_bytes",  # optional
        "runner": "stack",  # optional: ours / hf
        "device": "device",
        "device_name": "device_name",  # optional
        "dtype": "autocast",
        "torch": "torch",
        "commit": "commit",
        "allocator": "allocator",  # optional
        "command": "command",  # optional
    },
    "required": ["grad_ckpt", "mixed_precision", "lora", "status", "step_s", "peak_mib"],
    # Table 2: a measured part changing by less than this fraction of the vanilla value counts as "−".
    "threshold": 0.05,
}

TECHNIQUES = {  # report name -> the flag column that switches it
    "Gradient checkpointing": "grad_ckpt",
    "Mixed precision": "mixed_precision",
    "LoRA": "lora",
    "Gradient accumulation": "grad_accum",
}
MEMORY_PARTS = {  # Table 2 column -> measured bytes column
    "Parameters": "param_bytes",
    "Activations": "activation_bytes",
    "Gradients": "grad_bytes",
    "Optimizer state": "optim_bytes",
}
EXTRA_PARTS = {"Logits and loss": "logits_loss_bytes"}  # shown in the breakdown, not in Table 2


def find_file(folder: Path, names: list[str]) -> Path | None:
    """First of names that exists in folder; a glob pattern picks its newest match."""
    for name in names:
        if any(c in name for c in "*?["):
            matches = sorted(folder.glob(name), key=lambda p: p.stat().st_mtime, reverse=True)
            if matches:
                return matches[0]
        elif (folder / name).exists():
            return folder / name
    return None


def load_results(folder: Path, cfg: dict, tables: str, label: str, warnings: list):
    """(path, frame, None) for cfg's results file in folder, or (None, None, (provenance, section)) saying
    plainly that it is missing or unreadable and which command makes it."""
    from . import md

    path = find_file(folder, cfg["files"])
    if path is None:
        reason = f"no results file in `{md.shown_path(folder)}`"
        return None, None, (f"{label}: none yet", md.missing(tables, reason, cfg["command"]))
    frame, problem = read_table(path, cfg["columns"], cfg["required"])
    if frame is None:
        warnings.append(problem)
        return None, None, (f"{label} `{md.shown_path(path)}` (unreadable)", md.missing(tables, problem, cfg["command"]))
    return path, frame, None


def read_table(path: Path, columns: dict, required: list[str]) -> tuple[pd.DataFrame | None, str | None]:
    """Read a CSV or JSONL file and rename its columns to the report's names.

    Returns (frame, None), or (None, a one-line reason) when the file lacks a required column.
    """
    frame = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)
    frame = frame.rename(columns={theirs: ours for ours, theirs in columns.items() if theirs in frame.columns})
    for name in list(frame.columns):
        mib = name.removesuffix("_bytes") + "_mib"
        if name.endswith("_bytes") and mib not in frame.columns:
            frame[mib] = pd.to_numeric(frame[name], errors="coerce") / 2**20
    missing = [c for c in required if c not in frame.columns]
    if missing:
        return None, (
            f"`{path}` lacks the column(s) {', '.join(f'`{columns.get(c, c)}`' for c in missing)}; "
            f"its columns are {', '.join(f'`{c}`' for c in frame.columns)} (adapt `project/reports/inputs.py`)"
        )
    return frame, None


def read_json(path: Path):
    """A JSON document, or a list of the records of a JSONL file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def rename_keys(record: dict, keys: dict) -> dict:
    """A record with its keys renamed to the report's names (keys the mapping does not know are dropped)."""
    return {ours: record[theirs] for ours, theirs in keys.items() if theirs in record}


def read_summary(path: Path) -> dict:
    """summary.json as a dict, or the `- **key**: value` bullets of summary.md."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*-\s+\*\*(.+?)\*\*:\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out
