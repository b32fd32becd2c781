"""inference.py as a user runs it: the default model answers, bad input ends in one clear line without a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_script, tiny_model

from llama.checkpoint import REPO_ROOT, save_meta


def assert_paris(proc):
    assert proc.returncode == 0, proc.stderr
    assert ">>> What is the capital of France?" in proc.stdout
    answer = proc.stdout.split(">>> What is the capital of France?", 1)[1].split(">>>", 1)[0]
    assert "Paris" in answer
    assert "tokens/s" in proc.stdout


@pytest.mark.slow
def test_no_arguments_answers_the_capital_of_france():
    """The documented first run: three chat prompts, 64 new tokens each, on the embedded default model."""
    assert_paris(run_script("inference.py", timeout=1800))


def test_capital_of_france_short():
    """The same first prompt as the no-argument run (chat format, default model, dtype and device), shorter."""
    assert_paris(run_script("inference.py", "--prompt", "What is the capital of France?", "--max_gen_len", "10"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, llama3_tokenizer_path):
    """A tiny Meta-format checkpoint with the Llama 3 tokenizer and a 32-token context."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model = tiny_model(
        dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=128256, max_seq_len=32, tie_word_embeddings=True
    )
    save_meta(model, path, tokenizer_file=llama3_tokenizer_path)
    return path


def test_tiny_checkpoint_runs(tiny_ckpt):
    """The error cases below fail for the reason they name: this checkpoint itself is fine."""
    proc = run_script(
        "inference.py",
        "--ckpt_dir",
        tiny_ckpt,
        "--prompt",
        "Hi",
        "--max_gen_len",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert proc.returncode == 0, proc.stderr
    assert ">>> Hi" in proc.stdout


def assert_one_clear_line(proc, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_missing_ckpt_dir(tmp_path):
    assert_one_clear_line(run_script("inference.py", "--ckpt_dir", tmp_path / "missing"), "checkpoint not found")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_clear_line(run_script("inference.py", "--ckpt_dir", tmp_path), "is not a checkpoint")


def test_weights_that_do_not_match_the_config(tmp_path, tiny_ckpt):
    for f in tiny_ckpt.iterdir():
        (tmp_path / f.name).symlink_to(f)
    params = json.loads((tiny_ckpt / "params.json").read_text())
    (tmp_path / "params.json").unlink()
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": 32}))
    assert_one_clear_line(
        run_script("inference.py", "--ckpt_dir", tmp_path, "--dtype", "fp32"), "does not match the weights"
    )


def test_prompt_longer_than_the_context(tiny_ckpt):
    long_prompt = "word " * 40  # 40+ tokens for a 32-token context
    proc = run_script(
        "inference.py", "--ckpt_dir", tiny_ckpt, "--prompt", long_prompt, "--max_gen_len", "4", "--dtype", "fp32"
    )
    assert_one_clear_line(proc, "exceeds the model's context of 32")


def test_a_prompt_file_of_any_length_reaches_the_context_check(tiny_ckpt, tmp_path):
    """2,000 words through --prompt_file (and standard input): the context check answers, not fire's parser."""
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("word " * 2000)
    for source in (str(long_prompt), "-"):
        cmd = ["inference.py", "--ckpt_dir", tiny_ckpt, "--prompt_file", source, "--dtype", "fp32"]
        if source == "-":
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO_ROOT, env=env, capture_output=True,
                                  text=True, timeout=120, input=long_prompt.read_text())  # fmt: skip
        else:
            proc = run_script(*cmd, timeout=120)
        assert_one_clear_line(proc, "exceeds the model's context of 32")
    assert_one_clear_line(run_script("inference.py", "--prompt_file", tmp_path / "none.txt"), "--prompt_file")


def test_unknown_dtype():
    assert_one_clear_line(run_script("inference.py", "--dtype", "fp8"), "unknown dtype 'fp8'")


def test_unknown_device():
    assert_one_clear_line(run_script("inference.py", "--device", "tpu0"), "device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_when_there_is_none():
    assert_one_clear_line(run_script("inference.py", "--device", "cuda"), "no CUDA GPU")


def test_stream_prints_reply_text_up_to_the_stop_token(monkeypatch, llama3_tok):
    """TextStream writes exactly the decoded reply, holds back split multi-byte characters, stops at a stop id."""
    from inference import TextStream

    tok = llama3_tok
    reply = "Paris — the capital 🇫🇷 of France."
    ids = tok.encode(reply) + [tok.eos_id] + tok.encode(" junk")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    stream = TextStream(tok)
    written = []
    for step, i in enumerate(ids):
        before = out.getvalue()
        stream(step, torch.tensor([i]))
        written.append(out.getvalue()[len(before) :])
    assert out.getvalue() == reply
    assert all("\ufffd" not in w for w in written)


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_path):
    """Llama 3's byte-level tokenizer: emoji span several tokens there."""
    from llama.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer(llama3_tokenizer_path)
