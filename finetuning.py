"""Alpaca instruction tuning with hand-written LoRA, mixed precision, gradient accumulation and checkpointing.

    python finetuning.py                                  # SmolLM2-135M, 200 Alpaca records, LoRA r16 on wq/wv
    python finetuning.py --max_steps 2                    # a quick look (time per step, memory)
    python finetuning.py --optimizer adamw --lr 3e-4 --lr_schedule cosine --warmup_steps 5 --epochs 3 \
        --lora_targets wq,wk,wv,wo,w1,w2,w3 --out reports/finetune_recipe   # the recipe that learns (README)
    python finetuning.py --export hf,gguf,peft            # also write the model for transformers / llama.cpp / peft
    python finetuning.py --lora False --grad_ckpt all --precision bf16   # full fine-tuning
    python finetuning.py --base int4                      # LoRA on a 4-bit frozen base (QLoRA-style)
    python finetuning.py --resume                         # continue an interrupted run from its checkpoint

Writes under --out: summary.json (settings and results as data) and summary.md, train_log.jsonl (one line per
optimizer step), eval_log.jsonl (held-out loss and perplexity), loss.png (training and held-out curves),
samples.md / samples.json (greedy outputs for fixed and held-out prompts before and after training, side by
side). Checkpoints (training state for --resume, the final adapter or model, exports) go under --run_dir.
"""

from __future__ import annotations

import contextlib
import os
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
from project.distributed import STATE_DIR, fsdp_refusal, rank_device, setup, teardown
from project.export import check_formats
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
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    grad_clip: Optional[float] = None,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    max_seq_len: int = 512,
    max_records: Optional[int] = None,
    heldout: Optional[int] = None,
    eval_every: int = 10,
    on_bad_record: str = "skip",
    out: str = "reports/finetune",
    run_dir: str = "runs/finetune",
    save_every: int = 10,
    save_merged: Optional[str] = None,
    export: Sequence[str] = (),
    gguf_type: str = "f16",
    resume: bool = False,
    sample_max_gen_len: int = 64,
    device: str = "auto",
    seed: int = 0,
    distributed: Optional[str] = None,
):
    """Fine-tune a Llama 3.x model on instruction records; see the module docstring and README for every flag.

    precision: auto (bf16 where the device computes it natively, fp16 on older CUDA and MPS, else fp32), fp32,
    bf16 or fp16; it is the autocast dtype: full fine-tuning keeps fp32 master weights, LoRA weights are fp32.
    base: what a LoRA run holds its frozen base in: auto (the autocast dtype, fp32 without mixed precision),
    fp32, bf16, fp16, or int8 / int4 (quantized, QLoRA-style); see project/frozen_base.py.
    grad_ckpt: none, all, every-K or sqrt. max_records: use only the first N valid records.
    heldout: records kept out of training (default a tenth; chosen by a hash of their text, 0: none) for the
    held-out loss, measured before training, every eval_every optimizer steps and at the end.
    lr_schedule: constant, cosine or linear decay after warmup_steps of linear warm-up.
    save_merged: also write the model with the adapter merged in, as a Meta checkpoint, to this folder.
    export: any of peft (the adapter in peft's format, run_dir/peft_adapter), hf (the fine-tuned model, merged,
    as a Hugging Face folder, run_dir/hf) and gguf (as a GGUF file for llama.cpp, run_dir/model.gguf, weights
    in gguf_type: f32, f16, bf16 or q8_0). `python -m project.export` exports a finished run.
    distributed: ddp or fsdp under `torchrun --nproc_per_node N` (default there: ddp); --grad_accum is then
    per rank (project/distributed.py).
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
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
    )
    held = resolve_base(base, cfg.precision, lora_cfg is not None)
    out_dir, run_path = writable_dir(out, "--out"), writable_dir(run_dir, "--run_dir")
    for stale in remove_stale_temps(out_dir) + remove_stale_temps(run_path):
        log(f"removed {stale}, left by a save that was killed")
    formats = name_list(export)
    check_formats(formats, gguf_type, lora=lora_cfg is not None, base=held)
    if save_merged:
        writable_dir(save_merged, "--save_merged")
    if save_merged and held in QUANTIZED:
        raise UserError(f"--save_merged needs a full-precision base to merge into, not --base {held}")
    ranks = setup(distributed, dev)
    dev = rank_device(dev, ranks)
    if ranks.mode == "fsdp" and fsdp_refusal(held, cfg.precision):
        raise UserError(fsdp_refusal(held, cfg.precision))
    state = run_path / (STATE_DIR if ranks.on else "training_state.pt")
    if resume and not state.exists():
        raise UserError(f"--resume: no checkpoint at {state}; run without --resume to start")
    with quiet(not ranks.main):
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
            heldout=heldout,
            on_bad_record=on_bad_record,
            grad_ckpt=grad_ckpt,
            base=held,
            export=formats,
            gguf_type=gguf_type,
            save_merged=save_merged,
            resume=resume,
            sample_max_gen_len=sample_max_gen_len,
            command=command_line(ranks),
            ranks=ranks,
        )
    teardown(ranks)


def command_line(ranks) -> str:
    """The command that ran, with the torchrun launch when there was one."""
    args = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return f"torchrun --nproc_per_node {ranks.world} {args}" if ranks.on else f"python {args}"


@contextlib.contextmanager
def quiet(silent: bool):
    """Ranks other than 0 keep their messages to themselves (an error still reaches the terminal: the CLI prints
    it after this block has ended)."""
    if not silent:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


if __name__ == "__main__":
    retain_freed_memory()
    run(main)
