"""Alpaca instruction tuning with hand-written LoRA, mixed precision, gradient accumulation and checkpointing.

    python finetuning.py                                  # SmolLM2-135M, 200 Alpaca records, LoRA r16 on wq/wv
    python finetuning.py --max_steps 2                    # a quick look (time per step, memory)
    python finetuning.py --optimizer adamw --lr 1e-4 --epochs 3 --out reports/finetune-adamw
    python finetuning.py --lora False --grad_ckpt all --precision bf16   # full fine-tuning
    python finetuning.py --resume                         # continue an interrupted run from its checkpoint

Writes under --out: train_log.jsonl (one line per optimizer step), loss.png, samples.md / samples.json
(greedy outputs for fixed prompts before and after training, side by side) and summary.md. Checkpoints
(training state for --resume, the final adapter or model) go under --run_dir.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from llama.checkpoint import atomic_write, load_checkpoint, random_model, save_meta
from llama.generation import Llama
from llama.runtime import DTYPE_NAMES, describe, log, resolve_device, resolve_dtype
from project.allocator import allocator_settings, retain_freed_memory
from project.checkpointing import apply_checkpointing
from project.cli import run
from project.data import build_dataset, find_dataset, format_prompt, load_records, validate_records
from project.model.lora import apply_lora, describe_trainable, merge_lora, save_adapter
from project.train import TrainConfig, read_log, train

# Fixed prompts for the before/after comparison: the first is in the 200 training records, the others are not.
SAMPLE_RECORDS = [
    {"instruction": "Give three tips for staying healthy."},
    {"instruction": "What is the capital of France?"},
    {"instruction": "Translate the following sentence into French.", "input": "The weather is nice today."},
    {"instruction": "Write a haiku about autumn."},
]


def main(
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    data: Optional[str] = None,
    lora: bool = True,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] = ("wq", "wv"),
    grad_ckpt: str = "none",
    precision: str = "auto",
    batch_size: int = 1,
    grad_accum: int = 8,
    lr: float = 1e-5,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    grad_clip: Optional[float] = None,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    max_seq_len: int = 512,
    max_records: Optional[int] = None,
    on_bad_record: str = "skip",
    out: str = "reports/finetune",
    run_dir: str = "runs/finetune",
    save_every: int = 10,
    save_merged: Optional[str] = None,
    resume: bool = False,
    sample_max_gen_len: int = 64,
    device: str = "auto",
    seed: int = 0,
):
    """Fine-tune a Llama 3.x model on instruction records; see the module docstring and README for every flag.

    precision: auto (bf16 where the device computes it natively, fp16 on older CUDA and MPS, else fp32), fp32,
    bf16 or fp16;
    it is the autocast dtype: master weights (and LoRA weights) stay fp32.
    grad_ckpt: none, all, every-K or sqrt. max_records: use only the first N valid records.
    save_merged: also write the model with the adapter merged in, as a Meta checkpoint, to this folder.
    """
    command = "python " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if isinstance(lora_targets, str):
        lora_targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    dev = resolve_device(device)
    precision_name = DTYPE_NAMES[resolve_dtype(precision, dev)]
    cfg = TrainConfig(
        lr=lr, optimizer=optimizer, weight_decay=weight_decay, batch_size=batch_size, grad_accum=grad_accum,
        epochs=epochs, max_steps=max_steps, grad_clip=grad_clip, precision=precision_name, seed=seed,
        save_every=save_every,
    )  # fmt: skip
    out_dir, runs = Path(out), Path(run_dir)

    # Data first: a bad data file should fail before the model loads.
    data_path = find_dataset(data)
    records = validate_records(load_records(data_path), on_bad_record)
    if max_records is not None:
        records = records[:max_records]

    # Master weights in fp32; `precision` only sets the autocast dtype.
    start = time.perf_counter()
    if shape:
        model, tokenizer = random_model(shape, torch.float32, dev, seed)
        model_name = f"{shape} (random weights, seed {seed})"
    else:
        model, tokenizer = load_checkpoint(ckpt_dir, torch.float32, dev)
        model_name = str(ckpt_dir or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)")
    log(f"loaded {model_name} in {time.perf_counter() - start:.1f}s; {describe(dev, torch.float32)}")
    dataset = build_dataset(records, tokenizer, max_seq_len)
    log(f"{data_path}: {len(dataset)} examples, {dataset.n_truncated} truncated to {max_seq_len} tokens, "
        f"{dataset.n_dropped} dropped")  # fmt: skip

    torch.manual_seed(seed)
    if lora:
        apply_lora(model, lora_targets, lora_r, lora_alpha, lora_dropout)
    else:
        model.requires_grad_(True)
    trainable_text = describe_trainable(model)
    log(trainable_text)
    blocks = apply_checkpointing(model, grad_ckpt)

    # "Before" comes from the base model (a fresh adapter is the identity), also when resuming.
    sample_ids = [tokenizer.encode(format_prompt(r), bos=True) for r in SAMPLE_RECORDS]
    before = generate(model, tokenizer, dev, sample_ids, sample_max_gen_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    train(model, dataset, tokenizer.pad_id, cfg, dev, log_path, runs / "training_state.pt", resume)
    after = generate(model, tokenizer, dev, sample_ids, sample_max_gen_len)

    if lora:
        save_adapter(model, runs / "adapter.pt", dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=list(lora_targets)))
    if save_merged:
        if lora:
            merge_lora(model)
        save_meta(model, save_merged)
        log(f"merged model written to {save_merged} (Meta format; --ckpt_dir {save_merged} loads it)")
    elif not lora:
        save_meta(model, runs / "model")

    steps = read_log(log_path)
    write_samples(out_dir, before, after)
    plot_loss(steps, out_dir / "loss.png", f"{model_name}, {cfg.optimizer} lr {cfg.lr}, {cfg.precision} autocast")
    settings = {
        "model": model_name, "data": f"{data_path.name} ({len(dataset)} examples, {dataset.n_truncated} truncated, "
        f"max_seq_len {max_seq_len})", "LoRA": f"r {lora_r}, alpha {lora_alpha}, dropout {lora_dropout}, targets "
        f"{', '.join(lora_targets)}" if lora else "off (full fine-tuning)", "trainable": trainable_text,
        "gradient checkpointing": f"{grad_ckpt} ({len(blocks)} of {len(model.layers)} blocks)",
        "precision": f"{cfg.precision} autocast, fp32 master weights"
        + (", GradScaler" if cfg.precision == "fp16" else ""),
        "training": ", ".join(f"{k} {v}" for k, v in asdict(cfg).items()),
        "device": describe(dev, torch.float32) + f", {platform.processor() or platform.machine()}",
        "allocator": allocator_settings(), "versions": versions(), "command": f"`{command}`",
    }  # fmt: skip
    write_summary(out_dir / "summary.md", steps, settings)
    log(f"wrote {out_dir}/summary.md, loss.png, samples.md, train_log.jsonl")


def generate(model, tokenizer, device, prompt_ids: list[list[int]], max_gen_len: int) -> list[str]:
    """Greedy completions, fp32, one prompt at a time (no padding involved)."""
    model.eval()
    llama = Llama(model, tokenizer, device)
    texts = [tokenizer.decode(llama.generate([ids], max_gen_len).tokens[0]) for ids in prompt_ids]
    return texts


def versions() -> str:
    import matplotlib
    import numpy

    return f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, matplotlib {matplotlib.__version__}"


def write_samples(out_dir: Path, before: list[str], after: list[str]):
    rows = [dict(r, before=b, after=a) for r, b, a in zip(SAMPLE_RECORDS, before, after)]
    atomic_write(out_dir / "samples.json", lambda f: f.write(json.dumps(rows, indent=2, ensure_ascii=False).encode()))

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"

    lines = ["# Greedy outputs before and after fine-tuning", "",
             "Alpaca prompt template (plain text), greedy decoding, at most the configured number of new tokens.", "",
             "| Instruction | Before | After |", "|---|---|---|"]  # fmt: skip
    for r in rows:
        instruction = r["instruction"] + (f"<br>Input: {r['input']}" if r.get("input") else "")
        lines.append(f"| {cell(instruction)} | {cell(r['before'])} | {cell(r['after'])} |")
    atomic_write(out_dir / "samples.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))


def plot_loss(steps: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token cross-entropy)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_summary(path: Path, steps: list[dict], settings: dict):
    """Markdown summary computed from the step log."""
    lines = ["# Fine-tuning run", ""] + [f"- **{k}**: {v}" for k, v in settings.items()] + [""]
    if steps:
        k = max(1, min(5, len(steps) // 4))
        first = sum(s["loss"] for s in steps[:k]) / k
        last = sum(s["loss"] for s in steps[-k:]) / k
        timed = steps[1:] or steps  # the first step includes one-off warm-up
        lines += [
            "## Result (from train_log.jsonl)", "",
            f"- optimizer steps: {len(steps)} (skipped by the GradScaler: {sum(s['skipped'] for s in steps)})",
            f"- loss: first step {steps[0]['loss']:.4f}, last step {steps[-1]['loss']:.4f}; "
            f"mean of the first {k} steps {first:.4f}, of the last {k} steps {last:.4f} ({last - first:+.4f})",
            f"- time per optimizer step (after the first): {sum(s['step_s'] for s in timed) / len(timed):.2f} s; "
            f"{sum(s['tokens'] for s in timed) / sum(s['step_s'] for s in timed):.0f} tokens/s",
            f"- memory in use at the end of a step (max): {max(s['memory_bytes'] for s in steps) / 2**30:.2f} GiB "
            "(CPU: resident set of the process; CUDA/MPS: allocated by tensors)",
            "", "Files: `train_log.jsonl` (every optimizer step), `loss.png`, `samples.md` / `samples.json`.",
        ]  # fmt: skip
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


if __name__ == "__main__":
    if "--benchmark" in sys.argv[1:]:  # `finetuning.py --benchmark [flags]` runs benchmark_finetuning.py [flags]
        sys.argv.remove("--benchmark")
        from benchmark_finetuning import main as benchmark

        run(benchmark)
    else:
        retain_freed_memory()
        run(main)
