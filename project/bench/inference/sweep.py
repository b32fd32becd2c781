"""Run each inference configuration in its own fresh process (project.bench.harness), in order."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import ModelSource, save_hf
from llama.errors import UserError
from llama.runtime import DTYPE_NAMES, log
from project.bench.harness import run_child, status_line
from project.bench.inference.config import Spec
from project.bench.inference.hf import hf_source
from project.bench.inference.llamacpp import gguf_files

CHILD = "project.bench.inference.child"


def run_sweep(
    specs: list[Spec], folder: Path, on_result=None, timeout_s: Optional[float] = None
) -> list[tuple[Spec, dict]]:
    """Run the specs in order, one log line per configuration; on_result(done) after each (to save progress).
    A configuration still running after timeout_s seconds (loading included) is recorded as timeout.

    Hugging Face specs take the prompt ids of the matching run of ours, so both see the same tokens."""
    done: list[tuple[Spec, dict]] = []
    prompts: dict[int, list[int]] = {}
    for i, spec in enumerate(specs, 1):
        if spec.stack != "ours" and spec.prompt is None:
            spec.prompt = prompts.get(spec.input_len)
        start = time.perf_counter()
        result = run_child(CHILD, spec.to_dict(), folder, f"config{i}", timeout_s=timeout_s)
        if result.get("prompt") and spec.stack == "ours":
            prompts.setdefault(spec.input_len, result["prompt"])
        log(f"[{i}/{len(specs)}] {spec.name}: {status_line(result, ok_text)} ({time.perf_counter() - start:.0f}s)")
        done.append((spec, result))
        if on_result is not None:
            on_result(done)
    return done


def ok_text(result: dict) -> str:
    runs = sorted(result["runs"], key=lambda r: r["wall_s"])
    mid = runs[len(runs) // 2]
    return f"{mid['wall_s']:.2f} s, peak {mid['peak_bytes'] / 2**20:.0f} MiB"


def baseline_files(
    source: ModelSource, dtype: torch.dtype, stacks: list[str], quant_modes: list[str], folder: Path
) -> tuple[Optional[str], dict[str, str]]:
    """The weights the other stacks read, written from one load of ours (in the run's dtype): a folder in Hugging
    Face layout for transformers (None where it reads the checkpoint as it is: a Hugging Face folder or a GGUF
    file) and GGUF files for llama.cpp (project/bench/inference/llamacpp.py)."""
    hf = "hf" in stacks and not hf_reads(source)
    if not hf and "llamacpp" not in stacks:
        return None, {}
    model, tokenizer = source.load(dtype, "cpu")
    hf_dir = None
    if hf:
        log("converting the weights to Hugging Face layout for transformers ...")
        save_hf(model, folder / "hf")
        hf_dir = str(folder / "hf")
    ggufs = {}
    if "llamacpp" in stacks:
        ggufs = gguf_files(model, tokenizer, DTYPE_NAMES[dtype], quant_modes, folder)
    del model
    gc.collect()
    return hf_dir, ggufs


def hf_reads(source: ModelSource) -> bool:
    """Whether transformers loads source's checkpoint as it is (a Hugging Face folder or a GGUF file)."""
    if source.shape:
        return False
    try:
        hf_source(source.ckpt_dir)
        return True
    except UserError:
        return False
