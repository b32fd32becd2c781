"""Alpaca instruction tuning with hand-written LoRA, mixed precision, gradient accumulation and checkpointing.

    python finetuning.py                                  # SmolLM2-135M, 200 Alpaca records, LoRA r16 on wq/wv
    python finetuning.py --max_steps 2                    # a quick look (time per step, memory)
    python finetuning.py --optimizer adamw --lr 1e-4 --epochs 3 --out reports/finetune-adamw
    python finetuning.py --lora False --grad_ckpt all --precision bf16   # full fine-tuning
    python finetuning.py --base int4                      # LoRA on a 4-bit frozen base (QLoRA-style)
    python finetuning.py --resume                         # continue an interrupted run from its checkpoint

Writes under --out: summary.json (settings and results as data) and summary.md, train_log.jsonl (one line per
optimizer step), loss.png, samples.md / samples.json (greedy outputs for fixed prompts before and after
training, side by side). Checkpoints
(training state for --resume, the final adapter or model) go under --run_dir.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from llama.checkpoint import ModelSource, remove_stale_temps
from llama.errors import UserError
from llama.runtime import DTYPE_NAMES, log, resolve_device, resolve_dtype
from project.allocator import retain_freed_memory
from project.cli import name_list, run, writable_dir
from project.finetune import finetune
from project.frozen_base import QUANTIZED, resolve_base
from project.model.lora import LoRAConfig
from project.train import TrainConfig


def main(
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    data: Optional[str] = None,
    lora: bool = True,
    lora_r: int = LoRAConfig.r,
    lora_alpha: float = LoRAConfig.alpha,
    lora_dropout: float = LoRAConfig.dropout,
    lora_targets: Sequence[str] = LoRAConfig.targets,
    grad_ckpt: str = "none",
    precision: str = "auto",
    base: str = "auto",
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
    export: Sequence[str] = (),
    resume: bool = False,
    sample_max_gen_len: int = 64,
    device: str = "auto",
    seed: int = 0,
):
    """Fine-tune a Llama 3.x model on instruction records; see the module docstring and README for every flag.

    precision: auto (bf16 where the device computes it natively, fp16 on older CUDA and MPS, else fp32), fp32,
    bf16 or fp16; it is the autocast dtype: full fine-tuning keeps fp32 master weights, LoRA weights are fp32.
    base: what a LoRA run holds its frozen base in: auto (the autocast dtype, fp32 without mixed precision),
    fp32, bf16, fp16, or int8 / int4 (quantized, QLoRA-style); see project/frozen_base.py.
    grad_ckpt: none, all, every-K or sqrt. max_records: use only the first N valid records.
    save_merged: also write the model with the adapter merged in, as a Meta checkpoint, to this folder.
    export: peft also writes the adapter in peft's format to run_dir/peft_adapter (PeftModel.from_pretrained
    loads it on the same base in transformers).
    """
    source = ModelSource(ckpt_dir, shape, seed)
    lora_cfg = LoRAConfig(lora_r, lora_alpha, lora_dropout, name_list(lora_targets)) if lora else None
    dev = resolve_device(device)
    cfg = TrainConfig(
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        grad_clip=grad_clip,
        precision=DTYPE_NAMES[resolve_dtype(precision, dev)],
        seed=seed,
        save_every=save_every,
    )
    held = resolve_base(base, cfg.precision, lora_cfg is not None)
    out_dir, run_path = writable_dir(out, "--out"), writable_dir(run_dir, "--run_dir")
    for stale in remove_stale_temps(out_dir) + remove_stale_temps(run_path):
        log(f"removed {stale}, left by a save that was killed")
    formats = name_list(export)
    if [f for f in formats if f != "peft"] or (formats and not lora):
        raise UserError("--export takes peft (the LoRA adapter in peft's format; needs --lora True)")
    if save_merged:
        writable_dir(save_merged, "--save_merged")
    if resume and not (run_path / "training_state.pt").exists():
        raise UserError(f"--resume: no checkpoint at {run_path / 'training_state.pt'}; run without --resume to start")
    if save_merged and held in QUANTIZED:
        raise UserError(f"--save_merged needs a full-precision base to merge into, not --base {held}")
    finetune(
        source,
        lora_cfg,
        cfg,
        dev,
        out_dir,
        run_path,
        data=data,
        max_seq_len=max_seq_len,
        max_records=max_records,
        on_bad_record=on_bad_record,
        grad_ckpt=grad_ckpt,
        base=held,
        export=formats,
        save_merged=save_merged,
        resume=resume,
        sample_max_gen_len=sample_max_gen_len,
        command="python " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )


if __name__ == "__main__":
    retain_freed_memory()
    run(main)
