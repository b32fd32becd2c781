"""torchrun with DDP and FSDP2 against one process (CPU, gloo, 2 ranks, fp32, tiny model): the same windows,
the same loss normalisation, the same weights; FSDP's per-rank bytes; a killed run resumes from its DCP checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_finetune import tiny_model, write_records, write_tiny_checkpoint

from llama.checkpoint import REPO_ROOT, load_checkpoint
from llama.errors import UserError
from project.distributed import setup

# 6 records, 2 ranks x accumulation 2 = windows of 4 micro-batches: 2 steps per epoch, the second window short
# (rank 1 gets no example there and runs label-free micro-batches). SGD with a large lr so the weights move far.
SETTINGS = ["--optimizer", "sgd", "--lr", "0.5", "--lora_dropout", "0", "--epochs", "4", "--heldout", "0"]
SETTINGS += ["--sample_max_gen_len", "2", "--precision", "fp32", "--save_every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # Tied embeddings, as Llama 3.2's: full fine-tuning then takes both of their gradients through one node
    # (project/loss.py, TiedLookup), which DDP's and FSDP's gradient hooks must see complete.
    model = tiny_model(tie_word_embeddings=True)
    return write_tiny_checkpoint(root / "ckpt", model=model), write_records(root / "records.json"), root


def finetune(tiny, name, *flags, nproc=1):
    """finetuning.py on the tiny checkpoint, in one process or under torchrun; returns (run folder, step log)."""
    ckpt, data, root = tiny
    args = ["finetuning.py", "--ckpt_dir", ckpt, "--data", data, *SETTINGS, *flags]
    args += ["--out", root / name / "out", "--run_dir", root / name / "run"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*launcher, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (root / name / "out" / "train_log.jsonl").read_text().splitlines()]
    return root / name, log


def weights(run, lora: bool) -> dict[str, torch.Tensor]:
    """What the run trained: the adapter, or the whole model it saved."""
    if lora:
        return torch.load(run / "run" / "adapter.pt", weights_only=True)["state_dict"]
    return load_checkpoint(run / "run" / "model", torch.float32, "cpu")[0].state_dict()


@pytest.fixture(scope="module")
def single(tiny):
    """The references: one process accumulating 4 micro-batches, LoRA and full fine-tuning, 3 steps."""
    return {lora: finetune(tiny, f"single-{lora}", "--grad_accum", "4", "--max_steps", "3", "--lora", str(lora))
            for lora in (True, False)}  # fmt: skip


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_ranks_equal_one_process(tiny, single, mode, lora):
    """2 ranks x accumulation 2 reach the weights of 1 process x accumulation 4 after 3 steps (within 1e-5), with
    the same losses; under FSDP rank 0 holds about half of the parameters and of the gradients."""
    ref_run, ref_log = single[lora]
    flags = ["--grad_accum", "2", "--max_steps", "3", "--lora", str(lora), "--distributed", mode]
    run, log = finetune(tiny, f"{mode}-{lora}", *flags, nproc=2)
    want, got = weights(ref_run, lora), weights(run, lora)
    base = load_checkpoint(tiny[0], torch.float32, "cpu")[0].state_dict()
    moved = max((want[k] - (0 if lora else base[k])).abs().max().item() for k in want)
    assert moved > 1e-2  # training changed the weights, so agreeing means something
    assert want.keys() == got.keys() and max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-5
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-6)
    assert [r["label_tokens"] for r in log] == [r["label_tokens"] for r in ref_log]
    assert all(r["ranks"] == 2 for r in log)
    model = load_checkpoint(tiny[0], torch.float32, "cpu")[0]
    if lora:
        from project.model.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig())
    all_bytes = sum(p.numel() * 4 for p in model.parameters())
    grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    share = 0.5 if mode == "fsdp" else 1.0  # DDP replicates
    assert log[-1]["param_bytes"] == pytest.approx(share * all_bytes, rel=0.02)
    assert log[-1]["grad_bytes"] == pytest.approx(share * grad_bytes, rel=0.02)


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_weights(tiny):
    """SIGTERM to torchrun in the middle of a 2-rank FSDP run (wherever it lands, a checkpoint save included):
    the last complete training_state/ (sharded, with AdamW's moments) resumes, and 2 more steps reach the weights
    of a run that was never stopped."""
    ckpt, data, root = tiny
    flags = ["--grad_accum", "2", "--distributed", "fsdp", "--optimizer", "adamw", "--lr", "1e-2"]
    args = ["finetuning.py", "--ckpt_dir", ckpt, "--data", data, *SETTINGS, *flags, "--epochs", "400"]
    args += ["--out", root / "killed" / "out", "--run_dir", root / "killed" / "run"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*launcher, *map(str, args)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = root / "killed" / "out" / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in stderr, stderr[-2000:]
    step = json.loads((root / "killed" / "run" / "training_state" / "meta.json").read_text())["step"]
    assert step >= 3
    more = ["--epochs", "400", "--max_steps", str(step + 2)]
    resumed, resumed_log = finetune(tiny, "killed", *flags, *more, "--resume", nproc=2)
    whole, whole_log = finetune(tiny, "never-killed", *flags, *more, nproc=2)
    a, b = weights(whole, True), weights(resumed, True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in whole_log], rel=1e-6)


def test_distributed_flag_needs_several_processes():
    with pytest.raises(UserError, match="torchrun"):
        setup("fsdp", torch.device("cpu"))
    with pytest.raises(UserError, match="ddp or fsdp"):
        setup("zero3", torch.device("cpu"))


def test_resume_on_another_number_of_ranks(tiny):
    """A 2-rank FSDP checkpoint (2 x accumulation 2, AdamW) resumed on 4 ranks x accumulation 1, the same windows
    of 4: DCP reshards the adapters and AdamW's moments, and the run reaches the weights and losses of 2 ranks
    that never stopped. (4 ranks here also meet the short last window: ranks 2 and 3 run label-free batches.)"""
    flags = ["--distributed", "fsdp", "--optimizer", "adamw", "--lr", "1e-2", "--epochs", "2"]
    finetune(tiny, "reshard", *flags, "--grad_accum", "2", "--max_steps", "2", nproc=2)
    resumed, resumed_log = finetune(tiny, "reshard", *flags, "--grad_accum", "1", "--resume", nproc=4)
    whole, whole_log = finetune(tiny, "reshard-whole", *flags, "--grad_accum", "2", nproc=2)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in whole_log] == [1, 2, 3, 4]
    assert [r["ranks"] for r in resumed_log] == [2, 2, 4, 4]
    a, b = weights(whole, True), weights(resumed, True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in whole_log], rel=1e-6)
