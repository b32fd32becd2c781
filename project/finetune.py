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
from llama.export import require_bpe, save_tokenizer_files
from llama.generation import Llama
from llama.runtime import DTYPES, describe, log
from project.allocator import allocator_settings
from project.bench.harness import cpu_steal, cpu_ticks, device_name, environment
from project.checkpointing import apply_checkpointing
from project.data import build_dataset, find_dataset, format_prompt, load_records, split_heldout, validate_records
from project.distributed import SINGLE, Ranks, full_state_dict, wrap
from project.export import export_run
from project.frozen_base import load_dtype, prepare
from project.model.lora import LoRAConfig, count_parameters, merge_lora, save_adapter
from project.reports.finetune_run import write_run_report
from project.train import NextTokenLoss, TrainConfig, eval_log_path, read_log, train

# Fixed prompts for the before/after comparison (the first is among the 200 Alpaca records), then the first
# SAMPLE_HELDOUT held-out records.
SAMPLE_HELDOUT = 2
SAMPLE_RECORDS = [
    {"instruction": "Give three tips for staying healthy."},
    {"instruction": "What is the capital of France?"},
    {"instruction": "Translate the following sentence into French.", "input": "The weather is nice today."},
    {"instruction": "Write a haiku about autumn."},
]


def save_model_folder(model, tokenizer, folder: Path):
    """Meta's layout (consolidated.00.pth, params.json) and the tokenizer's files: a folder --ckpt_dir loads."""
    save_meta(model, folder)
    save_tokenizer_files(tokenizer, folder)


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
    heldout: Optional[int] = None,
    on_bad_record: str = "skip",
    grad_ckpt: str = "none",
    base: str = "fp32",
    save_merged: Optional[str] = None,
    export: tuple[str, ...] = (),
    gguf_type: str = "f16",
    resume: bool = False,
    sample_max_gen_len: int = 64,
    command: str = "",
    ranks: Ranks = SINGLE,
) -> dict:
    """Fine-tune source's model (LoRA adapters, or every weight when lora is None); returns the summary
    (on rank 0; other ranks of a distributed run return None once training is done).

    base: what the weights are held in, as project.frozen_base.resolve_base returned it.
    heldout: records kept out of training to measure the held-out loss on (project.data.split_heldout).
    ranks: this process's place in a torchrun job (project/distributed.py); device is then its own device.
    """
    # Data first: a bad data file should fail before the model loads.
    data_path = find_dataset(data)
    records = validate_records(load_records(data_path), on_bad_record)
    if max_records is not None:
        records = records[:max_records]
    train_records, held_records, held_indices = split_heldout(records, heldout)

    start = time.perf_counter()
    dtype = load_dtype(base, cfg.precision)
    model, tokenizer = source.load(dtype, device)
    log(f"loaded {source.name} in {time.perf_counter() - start:.1f}s; {describe(device, dtype)}")
    if "gguf" in export:
        require_bpe(tokenizer)
    dataset = build_dataset(train_records, tokenizer, max_seq_len)
    held_set = build_dataset(held_records, tokenizer, max_seq_len) if held_records else None
    log(
        f"{data_path}: {len(dataset)} training examples, {dataset.n_truncated} truncated to {max_seq_len} tokens, "
        f"{dataset.n_dropped} dropped; {len(held_records)} records held out (indices {held_indices})"
    )

    torch.manual_seed(cfg.seed)
    weights = count_parameters(model)[1]  # counted now: a quantized or 16-bit-stored base holds them as buffers
    held = prepare(model, lora, base, cfg.precision)
    log(held)
    trainable = count_parameters(model)[0]
    total = weights + (trainable if lora else 0)  # the base's weights and the adapters
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    blocks = apply_checkpointing(model, grad_ckpt)

    # "Before" comes from the base model (a fresh adapter is the identity), also when resuming.
    sample_records = sample_prompts(train_records, held_records)
    sample_ids = [tokenizer.encode(format_prompt(r), bos=True) for r in sample_records]
    before = generate(model, tokenizer, device, sample_ids, sample_max_gen_len) if ranks.main else []
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    ticks = cpu_ticks()
    net = wrap(NextTokenLoss(model), ranks, DTYPES[cfg.precision] if cfg.precision != "fp32" else None)
    train(
        net,
        dataset,
        tokenizer.pad_id,
        cfg,
        device,
        log_path,
        run_dir / "training_state.pt",
        resume,
        heldout=held_set,
        ranks=ranks,
    )
    steal = cpu_steal(ticks, cpu_ticks())
    if ranks.mode == "fsdp":  # gather the shards (every rank takes part) into a plain model on rank 0
        state = full_state_dict(net)
        if ranks.main:
            model, _ = source.load(dtype, device)
            torch.manual_seed(cfg.seed)
            prepare(model, lora, base, cfg.precision)
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    if not ranks.main:
        return None
    after = generate(model, tokenizer, device, sample_ids, sample_max_gen_len)

    if lora:
        save_adapter(model, run_dir / "adapter.pt", lora)
    export_run(model, tokenizer, lora, export, run_dir, source.name, gguf_type)
    if save_merged:
        if lora:
            merge_lora(model)
        save_model_folder(model, tokenizer, Path(save_merged))
        log(f"merged model written to {save_merged} (Meta format; --ckpt_dir {save_merged} loads it)")
    elif not lora:
        save_model_folder(model, tokenizer, run_dir / "model")

    env = environment(device)
    summary = {
        "model": source.name,
        "data": {
            "file": data_path.name,
            "examples": len(dataset),
            "truncated": dataset.n_truncated,
            "dropped": dataset.n_dropped,
            "max_seq_len": max_seq_len,
            "heldout_records": held_indices,  # indices into the valid records: never trained on
            "heldout_rule": f"the {len(held_indices)} records with the smallest SHA-256 of their text",
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
        "distributed": {"mode": ranks.mode, "ranks": ranks.world},
        "allocator": allocator_settings(),
        "cpu_steal": steal,  # share of CPU time a hypervisor gave other guests during training (None: not Linux)
        "versions": {k: env[k] for k in ("python", "torch", "numpy")},
        "command": command,
    }
    samples = [
        dict(r, before=b, after=a, before_stopped=bs, after_stopped=as_)
        for r, (b, bs), (a, as_) in zip(sample_records, before, after)
    ]
    write_run_report(out_dir, summary, read_log(log_path), samples, read_log(eval_log_path(log_path)))
    log(f"wrote {out_dir}/summary.json, summary.md, loss.png, samples.md, train_log.jsonl, eval_log.jsonl")
    return summary


def sample_prompts(train_records: list[dict], held_records: list[dict]) -> list[dict]:
    """The fixed sample prompts, then the first held-out records, each with "set": where it stands
    ("trained on", "held out" or "not in the data")."""

    def among(r, records):
        return any((t["instruction"], t.get("input", "")) == (r["instruction"], r.get("input", "")) for t in records)

    def where(r):
        return "held out" if among(r, held_records) else "trained on" if among(r, train_records) else "not in the data"

    fixed = [dict(r, set=where(r)) for r in SAMPLE_RECORDS]
    extra = [r for r in held_records if not among(r, SAMPLE_RECORDS)][:SAMPLE_HELDOUT]
    return fixed + [{"instruction": r["instruction"], "input": r.get("input", ""), "set": "held out"} for r in extra]


def generate(model, tokenizer, device, prompt_ids: list[list[int]], max_gen_len: int) -> list[tuple[str, bool]]:
    """Greedy completions in the weights' dtype, one prompt at a time (no padding involved): (text, whether it
    ended with a stop token within max_gen_len)."""
    model.eval()
    llama = Llama(model, tokenizer, device)
    outs = [llama.generate([ids], max_gen_len) for ids in prompt_ids]
    return [(tokenizer.decode(o.tokens[0]), o.stopped[0]) for o in outs]
