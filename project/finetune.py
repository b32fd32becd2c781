"""One fine-tuning job, as `finetuning.py` runs it: data, model, LoRA, checkpointing, training, samples, outputs.

Full fine-tuning keeps fp32 master weights whatever the precision (`TrainConfig.precision` is the autocast
dtype); a LoRA run holds its frozen base as project/frozen_base.py chooses (the autocast dtype under mixed
precision, or int8 / int4 on request) and its adapters in fp32. The job's
record is data, `summary.json`; summary.md, samples.md and loss.png are rendered from it
(project/reports/finetune_run.py), and the phase 3 report reads the same files.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import ModelSource, save_meta
from llama.generation import Llama
from llama.runtime import describe, log
from project.allocator import allocator_settings
from project.bench.harness import cpu_steal, cpu_ticks, device_name, environment
from project.checkpointing import apply_checkpointing
from project.data import build_dataset, find_dataset, format_prompt, load_records, validate_records
from project.export import save_peft_adapter
from project.frozen_base import load_dtype, prepare
from project.model.lora import LoRAConfig, count_parameters, describe_trainable, merge_lora, save_adapter
from project.reports.finetune_run import write_run_report
from project.train import TrainConfig, read_log, train

# Fixed prompts for the before/after comparison: the first is in the 200 training records, the others are not.
SAMPLE_RECORDS = [
    {"instruction": "Give three tips for staying healthy."},
    {"instruction": "What is the capital of France?"},
    {"instruction": "Translate the following sentence into French.", "input": "The weather is nice today."},
    {"instruction": "Write a haiku about autumn."},
]


def finetune(
    source: ModelSource,
    lora: Optional[LoRAConfig],
    cfg: TrainConfig,
    device: torch.device,
    out_dir: Path,
    run_dir: Path,
    data: Optional[str] = None,
    max_seq_len: int = 512,
    max_records: Optional[int] = None,
    on_bad_record: str = "skip",
    grad_ckpt: str = "none",
    base: str = "fp32",
    save_merged: Optional[str] = None,
    export: tuple[str, ...] = (),
    resume: bool = False,
    sample_max_gen_len: int = 64,
    command: str = "",
) -> dict:
    """Fine-tune source's model (LoRA adapters, or every weight when lora is None); returns the summary.

    base: what the weights are held in, as project.frozen_base.resolve_base returned it.
    """
    # Data first: a bad data file should fail before the model loads.
    data_path = find_dataset(data)
    records = validate_records(load_records(data_path), on_bad_record)
    if max_records is not None:
        records = records[:max_records]

    start = time.perf_counter()
    dtype = load_dtype(base, cfg.precision)
    model, tokenizer = source.load(dtype, device)
    log(f"loaded {source.name} in {time.perf_counter() - start:.1f}s; {describe(device, dtype)}")
    dataset = build_dataset(records, tokenizer, max_seq_len)
    log(
        f"{data_path}: {len(dataset)} examples, {dataset.n_truncated} truncated to {max_seq_len} tokens, "
        f"{dataset.n_dropped} dropped"
    )

    torch.manual_seed(cfg.seed)
    held = prepare(model, lora, base, cfg.precision)
    log(held)
    log(describe_trainable(model))
    trainable, total = count_parameters(model)
    blocks = apply_checkpointing(model, grad_ckpt)

    # "Before" comes from the base model (a fresh adapter is the identity), also when resuming.
    sample_ids = [tokenizer.encode(format_prompt(r), bos=True) for r in SAMPLE_RECORDS]
    before = generate(model, tokenizer, device, sample_ids, sample_max_gen_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    ticks = cpu_ticks()
    train(model, dataset, tokenizer.pad_id, cfg, device, log_path, run_dir / "training_state.pt", resume)
    steal = cpu_steal(ticks, cpu_ticks())
    after = generate(model, tokenizer, device, sample_ids, sample_max_gen_len)

    if lora:
        save_adapter(model, run_dir / "adapter.pt", lora)
    if "peft" in export:
        save_peft_adapter(model, run_dir / "peft_adapter", lora, base_model=source.name)
        log(f"peft adapter written to {run_dir / 'peft_adapter'} (PeftModel.from_pretrained loads it)")
    if save_merged:
        if lora:
            merge_lora(model)
        save_meta(model, save_merged)
        log(f"merged model written to {save_merged} (Meta format; --ckpt_dir {save_merged} loads it)")
    elif not lora:
        save_meta(model, run_dir / "model")

    env = environment(device)
    summary = {
        "model": source.name,
        "data": {
            "file": data_path.name,
            "examples": len(dataset),
            "truncated": dataset.n_truncated,
            "dropped": dataset.n_dropped,
            "max_seq_len": max_seq_len,
        },
        "lora": asdict(lora) if lora else None,
        "base": base,
        "weights": held,
        "trainable_params": trainable,
        "total_params": total,
        "grad_ckpt": {"policy": grad_ckpt, "blocks": len(blocks), "of": len(model.layers)},
        "training": asdict(cfg),
        "device": str(device),
        "device_name": device_name(device),
        "threads": env["threads"],
        "allocator": allocator_settings(),
        "cpu_steal": steal,  # share of CPU time a hypervisor gave other guests during training (None: not Linux)
        "versions": {k: env[k] for k in ("python", "torch", "numpy")},
        "command": command,
    }
    samples = [dict(r, before=b, after=a) for r, b, a in zip(SAMPLE_RECORDS, before, after)]
    write_run_report(out_dir, summary, read_log(log_path), samples)
    log(f"wrote {out_dir}/summary.json, summary.md, loss.png, samples.md, train_log.jsonl")
    return summary


def generate(model, tokenizer, device, prompt_ids: list[list[int]], max_gen_len: int) -> list[str]:
    """Greedy completions in the weights' dtype, one prompt at a time (no padding involved)."""
    model.eval()
    llama = Llama(model, tokenizer, device)
    return [tokenizer.decode(llama.generate([ids], max_gen_len).tokens[0]) for ids in prompt_ids]
