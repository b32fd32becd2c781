"""Bad flags stop the scripts at once with one `error:` line (project/cli.py), before any model is loaded."""

import os
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest
import torch

from llama.checkpoint import REPO_ROOT
from llama.errors import UserError
from project.cli import checked, uninterrupted, unknown_flag
from project.model.lora import LoRAConfig
from tests.conftest import run_script
from tests.tiny_finetune import write_records, write_tiny_checkpoint

NAMES = {"resume", "lr", "lora", "max_steps", "out"}


def test_unknown_flags_name_the_closest_valid_one():
    assert unknown_flag(["--resum"], NAMES) == "unknown flag --resum: did you mean --resume?"
    assert unknown_flag(["--lr=1e-4", "--nolora", "--max-steps", "3", "--help"], NAMES) is None
    assert unknown_flag(["--lr", "1", "--", "--whatever"], NAMES) is None  # after `--`: fire's own flags
    assert unknown_flag(["--zzzzzz"], NAMES).startswith("unknown flag --zzzzzz: valid flags: --lora --lr")
    assert unknown_flag(["-3", "text"], NAMES) is None  # values, not flags


def test_values_are_checked_against_the_annotations():
    def main(n: int = 1, x: float = 0.5, flag: bool = True, steps: Optional[int] = None, name: str = "a"):
        return n, x, flag, steps, name

    f = checked(main)
    assert f(n=2, x=1, flag=False, steps=None, name=3) == (2, 1, False, None, 3)  # an int is a number; str free
    for kwargs, message in [
        ({"n": "ten"}, "--n takes an integer, not 'ten'"),
        ({"n": True}, "--n takes an integer"),
        ({"x": "abc"}, "--x takes a number, not 'abc'"),
        ({"flag": 0}, "--flag takes True or False"),
        ({"steps": 2.5}, "--steps takes an integer (or None), not 2.5"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            f(**kwargs)


def test_lora_settings_out_of_range_are_refused():
    with pytest.raises(UserError, match="--lora_alpha must be positive"):
        LoRAConfig(alpha=-1)
    with pytest.raises(UserError, match=r"--lora_dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=1.5)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["finetuning.py", "--resum"], "error: unknown flag --resum: did you mean --resume?"),
        (["finetuning.py", "--lora_dropout", "1.5"], "error: --lora_dropout must be in [0, 1), not 1.5"),
        (["finetuning.py", "--max_steps", "ten"], "error: --max_steps takes an integer (or None), not 'ten'"),
        (["finetuning.py", "--resume", "--run_dir", "{tmp}/none"], "error: --resume: no checkpoint at"),
        (["finetuning.py", "--run_dir", "/proc/not-here"], "error: --run_dir /proc/not-here is not a writable"),
        (["finetuning.py", "--base", "int4", "--lora", "False"], "error: --base int4 needs LoRA"),
        (["inference.py", "--max_gen_len", "ten"], "error: --max_gen_len takes an integer, not 'ten'"),
        (["inference.py", "--top_k", "-3"], "error: --top_k must be 0 (off) or a positive count, not -3"),
        (["inference.py", "--temperature", "-1"], "error: --temperature must be 0 (greedy) or positive"),
        (["inference.py", "--temperature", "abc"], "error: --temperature takes a number, not 'abc'"),
        (["benchmark_inference.py", "--batch_sise", "1"], "error: unknown flag --batch_sise: did you mean"),
        (["inference.py", "--compile", "--compile_mode", "fast"], "error: --compile_mode must be one of default, "),
        (["benchmark_inference.py", "--compile_mode", "fast"], "error: --compile_mode must be one of default, "),
        (["benchmark_finetuning.py", "--confgs", "lora"], "error: unknown flag --confgs: did you mean --configs?"),
        (["finetuning.py", "--lr_schedule", "step"], "error: --lr_schedule must be one of constant, cosine, linear"),
        (["finetuning.py", "--heldout", "500"], "error: --heldout 500 leaves no training records"),
        (["finetuning.py", "--export", "onnx"], "error: --export takes any of peft, hf, gguf, not onnx"),
        (["finetuning.py", "--distributed", "fsdp"], "error: --distributed fsdp needs several processes"),
        (["benchmark_finetuning.py", "--nproc", "2", "--distributed", "zero"], "error: --distributed takes ddp and/or"),
        (["-m", "project.export", "--run_dir", "{tmp}", "--formats", "hf"], "error: {tmp} has neither adapter.pt"),
    ],
)
def test_each_script_stops_with_one_line_before_loading_anything(args, expected, tmp_path):
    proc = run_script(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith(expected.replace("{tmp}", str(tmp_path))), lines[-1]
    assert "Traceback" not in proc.stderr and "loaded" not in proc.stderr + proc.stdout  # no model was loaded


def test_a_bad_fp32_kernel_setting_stops_a_script_before_loading(tmp_path):
    env = dict(os.environ, EFFICIENT_LLAMA_FP32_MATMUL="mkl", XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "inference.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: EFFICIENT_LLAMA_FP32_MATMUL must be auto, blas or onednn, not 'mkl'"
    )
    assert "Traceback" not in proc.stderr and "loaded" not in proc.stderr + proc.stdout


def test_sigterm_mid_training_says_interrupted_keeps_the_checkpoint_and_resume_finishes(tmp_path):
    """SIGTERM (a scheduler's kill) during training: exit 143, "interrupted", no temporary file left, the last
    checkpoint loads, and --resume finishes the run. A stale temporary file from a killed save is removed."""
    ckpt, data = write_tiny_checkpoint(tmp_path / "ckpt"), write_records(tmp_path / "records.json")
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "training_state.pt.k3x9a_2b.tmp").write_bytes(b"half a checkpoint")
    args = ["finetuning.py", "--ckpt_dir", ckpt, "--data", data, "--out", out, "--run_dir", run_dir, "--epochs", 400,
            "--grad_accum", 1, "--save_every", 1, "--sample_max_gen_len", 2, "--precision", "fp32"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert "removed" in stderr and not list(run_dir.glob("*.tmp")) and not list(out.glob("*.tmp"))
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    assert state["step"] >= 2
    done = run_script(*args[:-6], "--max_steps", state["step"] + 2, "--save_every", 1, "--sample_max_gen_len", 2,
                      "--precision", "fp32", "--resume", timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {run_dir / 'training_state.pt'} after optimizer step {state['step']}" in done.stderr


def test_a_signal_during_a_save_is_delivered_after_it():
    """Ctrl-C inside uninterrupted() does not stop the block; it arrives once the block is over."""
    # Python's own Ctrl-C handler, also where the tests were started in the background (which ignores SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.01)  # a Python-level handler would have raised by now
                finished = True
        assert finished
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_unreadable_training_state_or_adapter_is_one_line_naming_the_file(tmp_path):
    import argparse

    from llama.checkpoint import load_torch_file

    good = tmp_path / "good.pt"
    torch.save({"config": {}, "state_dict": {"a": torch.ones(1000)}}, good)
    cases = {
        "garbage.pt": b"this is not a checkpoint",
        "truncated.pt": good.read_bytes()[: len(good.read_bytes()) // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save(argparse.Namespace(x=1), tmp_path / "objects.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    for name in [*cases, "objects.pt", "missing.pt"]:
        with pytest.raises(UserError, match=f"cannot read adapter .*{name}: ") as e:
            load_torch_file(tmp_path / name, "adapter", ("config", "state_dict"))
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="other.pt is not one this project wrote: it has no config, state_dict"):
        load_torch_file(tmp_path / "other.pt", "adapter", ("config", "state_dict"))
    assert load_torch_file(good, "adapter", ("config",))["state_dict"]["a"].sum() == 1000


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    from llama.checkpoint import load_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "ckpt")
    (weights,) = folder.glob("*.safetensors")
    for keep in (len(weights.read_bytes()) // 2, 5):  # cut among the tensors, inside the header
        data = weights.read_bytes()
        weights.write_bytes(data[:keep])
        with pytest.raises(UserError, match=f"cannot read {weights}: .*truncated"):
            load_checkpoint(folder, torch.float32, "cpu")
        weights.write_bytes(data)
