"""The training loop: loss normalisation under accumulation, checkpointing, mixed precision, end to end, resume."""

import functools
import json
import math
import subprocess
import sys

import pytest
import torch
from tiny_finetune import PAD, RECORDS, byte_tokenizer, grads, tiny_model, write_records, write_tiny_checkpoint

import finetuning
from llama.checkpoint import REPO_ROOT, load_checkpoint
from llama.errors import UserError
from llama.runtime import has_native_matmul
from project import finetune
from project.checkpointing import apply_checkpointing, checkpoint_blocks
from project.data import IGNORE_INDEX, build_dataset, collate
from project.memory import SavedTensorMeter
from project.model.lora import LoRAConfig, apply_lora
from project.train import (
    NextTokenLoss,
    TrainConfig,
    evaluate,
    label_tokens,
    loss_sum,
    lr_at,
    make_scaler,
    read_log,
    train,
    train_step,
)


class RecordGrads(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was asked to apply."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure)


def examples(n=4):
    """n hand-made records of different lengths, tokenised one byte per token."""
    ds = build_dataset(RECORDS[:n], byte_tokenizer(), max_seq_len=512)
    assert len({len(e.input_ids) for e in ds.examples}) == n  # really different lengths
    return ds.examples


def reference_loss(model, ids, labels):
    """Mean next-token cross-entropy over the label tokens, written out: -log softmax at the target id."""
    logp = torch.log_softmax(model(ids).float(), dim=-1)[:, :-1]
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return -(picked * counted).sum() / counted.sum()


def test_accumulated_gradients_equal_one_big_batch():
    exs = examples(4)
    model = tiny_model()
    model.requires_grad_(True)
    opt = RecordGrads(model.parameters(), lr=0.0)
    micro = [collate([e], PAD) for e in exs]  # 4 micro-batches of 1, each its own length
    train_step(NextTokenLoss(model), micro, opt, make_scaler(torch.device("cpu"), "fp32"), "fp32")
    accumulated = {n: opt.seen[id(p)] for n, p in model.named_parameters()}

    ids, labels = collate(exs, PAD)  # one batch of 4, right-padded
    reference_loss(model, ids, labels).backward()
    big = grads(model)
    for name, g in big.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=1e-5, msg=name)

    # Averaging each micro-batch's own mean would give a different (wrong) gradient: the test can fail.
    model.zero_grad()
    for ids_i, labels_i in micro:
        (loss_sum(model, ids_i, labels_i) / label_tokens(labels_i) / len(micro)).backward()
    naive = grads(model)
    assert not torch.allclose(naive["output.weight"], big["output.weight"], rtol=1e-3, atol=1e-5)


def test_checkpoint_policies_choose_blocks():
    assert checkpoint_blocks("none", 16) == set()
    assert checkpoint_blocks("all", 16) == set(range(16))
    assert checkpoint_blocks("every-3", 10) == {0, 3, 6, 9}
    assert checkpoint_blocks("sqrt", 16) == {0, 4, 8, 12}
    assert len(checkpoint_blocks("sqrt", 30)) == 6
    for bad in ("every-0", "every-x", "some"):
        with pytest.raises(UserError):
            checkpoint_blocks(bad, 4)


@pytest.mark.parametrize("policy", ["all", "every-2", "sqrt"])
def test_checkpointing_gives_the_same_gradients(policy):
    ids, labels = collate(examples(2), PAD)
    model = apply_lora(tiny_model(), LoRAConfig(targets=("wq", "wv", "w2"), r=4, alpha=8.0, dropout=0.0))
    model.train()
    loss_sum(model, ids, labels).backward()
    plain = grads(model)
    model.zero_grad()

    runs = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):
        # Hooked inside the block: the block's own hooks run once per call, outside the checkpoint.
        layer.feed_forward.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    chosen = apply_checkpointing(model, policy)
    assert chosen
    loss_sum(model, ids, labels).backward()
    # A checkpointed block runs its forward twice (once more in backward): checkpointing really happened.
    assert runs == [2 if i in chosen else 1 for i in range(len(model.layers))]
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_keeps_parameter_names_and_none_undoes_it():
    """Wrapping adds no module (LoRA adapters and checkpoints are keyed by name); a later policy replaces it."""
    ids, labels = collate(examples(2), PAD)
    model = apply_lora(tiny_model(), LoRAConfig(targets=("wq", "wv", "w2"), r=4, alpha=8.0, dropout=0.0)).train()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    assert "layers.0.attention.wq.lora_A" in names

    def saved_bytes():
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss_sum(model, ids, labels)
        return meter.bytes

    plain = saved_bytes()
    assert apply_checkpointing(model, "all") == set(range(len(model.layers)))
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    model.load_state_dict(model.state_dict())
    assert saved_bytes() < plain
    with torch.inference_mode():  # no autograd: the wrapped blocks run plainly
        model(ids)
    assert apply_checkpointing(model, "none") == set()
    assert saved_bytes() == plain
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_lowers_the_loss_on_a_repeated_batch(precision):
    cpu = torch.device("cpu")
    model = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    batch = [collate(examples(2), PAD)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    scaler = make_scaler(cpu, precision)
    assert scaler.is_enabled() == (precision == "fp16")
    losses = [train_step(NextTokenLoss(model), batch, opt, scaler, precision).loss for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    # Master and LoRA weights stay fp32 whatever the autocast dtype.
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_an_overflowing_fp16_step_is_skipped_by_the_scaler():
    model = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():  # non-zero B so that every adapter gets a gradient
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.fill_(0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    # A loss scale of 2^100 overflows fp16 (max 65504) in the backward pass's fp16 matmuls.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    result = train_step(NextTokenLoss(model), [collate(examples(2), PAD)], opt, scaler, "fp16")
    assert result.skipped and scaler.get_scale() == 2.0**99
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # With a sane scale the next step is applied.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert not train_step(NextTokenLoss(model), [collate(examples(2), PAD)], opt, scaler, "fp16").skipped
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_grad_clip_under_fp16_clips_the_unscaled_gradients():
    """With a loss scale of 2^10 the .grad tensors hold 1024x the true gradients; clipping must see the true norm
    (unscale first), and SGD with lr 1 then moves the adapters by exactly the clip norm."""
    model = apply_lora(tiny_model(), LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.fill_(0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = collate(examples(2), PAD)
    with torch.autocast("cpu", dtype=torch.float16):  # the true gradient, for the expected norm
        (loss_sum(model, ids, labels) / label_tokens(labels)).backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    clip = true_norm / 10
    result = train_step(
        NextTokenLoss(model), [(ids, labels)], torch.optim.SGD(params, lr=1.0), scaler, "fp16", grad_clip=clip
    )
    assert not result.skipped and result.grad_norm == pytest.approx(true_norm, rel=1e-3)
    moved = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in zip(params, before)])).item()
    assert moved == pytest.approx(clip, rel=1e-3)


# ---- learning-rate schedule and held-out evaluation ---------------------------------------------------------
def test_lr_schedules_by_hand():
    """lr 1, 2 warm-up steps (1/3, 2/3), then 4 decay steps whose fraction done is 0, 1/4, 2/4, 3/4."""
    steps = range(1, 7)
    warm = [1 / 3, 2 / 3]
    const = TrainConfig(lr=1.0, warmup_steps=2)
    linear = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule="linear")
    cosine = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule="cosine")
    assert [lr_at(s, 6, const) for s in steps] == pytest.approx(warm + [1, 1, 1, 1])
    assert [lr_at(s, 6, linear) for s in steps] == pytest.approx(warm + [1, 0.75, 0.5, 0.25])
    half = 0.5 * (1 + 2**-0.5)  # cos(pi/4) = 1/sqrt(2)
    assert [lr_at(s, 6, cosine) for s in steps] == pytest.approx(warm + [1, half, 0.5, 1 - half])
    assert lr_at(3, 3, TrainConfig(lr=2.0)) == 2.0
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_heldout_loss_is_the_token_weighted_mean_and_leaves_the_mode():
    """evaluate() against the cross-entropy written out per example, weighted by each one's label tokens,
    with dropout on in training mode (evaluate must turn it off) and batches of 2 with padding."""
    model = apply_lora(tiny_model(seed=3), LoRAConfig(dropout=0.5))
    ds = build_dataset(RECORDS, byte_tokenizer(), max_seq_len=512)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for e in ds.examples:
            ids, labels = collate([e], PAD)
            k = label_tokens(labels)
            total += reference_loss(model, ids, labels).item() * k
            n += k
    model.train()
    result = evaluate(NextTokenLoss(model), ds, PAD, torch.device("cpu"), TrainConfig(batch_size=2))
    assert model.training
    assert result["label_tokens"] == n and result["loss"] == pytest.approx(total / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


# ---- end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return write_tiny_checkpoint(root / "ckpt"), write_records(root / "records.json"), root


def run_finetuning(tiny_run, name, **kw):
    ckpt, data, root = tiny_run
    args = dict(
        ckpt_dir=str(ckpt),
        data=str(data),
        out=str(root / name / "reports"),
        run_dir=str(root / name / "run"),
        grad_accum=2,
        lr=1e-2,
        optimizer="adamw",
        sample_max_gen_len=4,
        # fp32 everywhere: the default (auto) is bf16 with a bf16 frozen base on CPUs with native bf16, whose
        # merged and exported weights then differ from the fp32 base + adapter by bf16's rounding.
        precision="fp32",
    )
    finetuning.main(**{**args, **kw})
    out = root / name
    return out, [json.loads(line) for line in (out / "reports" / "train_log.jsonl").read_text().splitlines()]


def test_finetuning_end_to_end_lowers_the_loss(tiny_run):
    out, log = run_finetuning(tiny_run, "e2e", epochs=8, precision="auto")
    assert [r["step"] for r in log] == list(range(1, 25))  # 6 records / (1 x 2) = 3 steps per epoch
    first_epoch = sum(r["loss"] for r in log[:3]) / 3
    last_epoch = sum(r["loss"] for r in log[-3:]) / 3
    assert last_epoch < first_epoch - 0.5, (first_epoch, last_epoch)
    for f in ("summary.json", "summary.md", "loss.png", "samples.md", "samples.json"):
        assert (out / "reports" / f).stat().st_size > 0
    summary = (out / "reports" / "summary.md").read_text()
    data = json.loads((out / "reports" / "summary.json").read_text())
    # --precision auto on the device the run used (--device auto: a GPU where there is one): bf16 where it computes
    # bf16 natively, else fp16 on a GPU (a P100) and plain fp32 on a CPU (e.g. AVX2-only or AVX-512 without BF16).
    device = torch.device(data["device"])
    fallback = "fp32" if device.type == "cpu" else "fp16"
    expected = "bf16" if has_native_matmul(device, torch.bfloat16) else fallback
    assert f"{expected} autocast" in summary and "command" in summary and "optimizer steps: 24" in summary
    assert data["training"]["precision"] == expected and data["result"]["steps"] == 24
    assert data["result"]["loss_first"] == log[0]["loss"] and data["result"]["loss_last"] == log[-1]["loss"]
    assert data["lora"]["targets"] == ["wq", "wv"] and 0 < data["trainable_params"] < data["total_params"]
    samples = json.loads((out / "reports" / "samples.json").read_text())
    assert len(samples) == len(finetune.SAMPLE_RECORDS) and all({"before", "after"} <= set(s) for s in samples)
    assert (out / "run" / "adapter.pt").exists() and (out / "run" / "training_state.pt").exists()


def test_the_parameter_count_includes_a_quantized_or_stored_base(tiny_run):
    """summary.json's total is the checkpoint's weights plus the adapters however the frozen base is held (an
    int8 or bf16-stored base keeps its weights as buffers, which a count of parameters alone would miss)."""
    weights = sum(p.numel() for p in load_checkpoint(tiny_run[0], torch.float32, "cpu")[0].parameters())
    for base in ("fp32", "int8", "bf16"):
        out, _ = run_finetuning(tiny_run, f"count-{base}", base=base, precision="fp32", max_steps=1, heldout=0)
        data = json.loads((out / "reports" / "summary.json").read_text())
        adapters = 4 * (LoRAConfig.r * (32 + 32) + LoRAConfig.r * (32 + 16))  # 4 layers; wq 32->32, wv 32->16
        assert data["trainable_params"] == adapters, base
        assert data["total_params"] == weights + adapters, base


def test_resume_after_interruption_reaches_the_same_weights(tiny_run, monkeypatch):
    """Also the held-out log: 2 of the 6 records held out, evaluated at steps 0, 3, 6 and 7 (the end), both runs
    the same; the interrupted one had evaluated at step 3, before its last checkpoint (step 4)."""
    # dropout: the RNG state matters; 4 training records / (1 x 2) = 2 steps per epoch
    settings = dict(
        epochs=4, max_steps=7, save_every=2, lora_dropout=0.1, heldout=2, eval_every=3, lr_schedule="cosine"
    )
    full, full_log = run_finetuning(tiny_run, "uninterrupted", **settings)

    done = []

    def interrupted_step(*args, **kw):
        if len(done) == 5:  # Ctrl-C during step 6; the last checkpoint was after step 4
            raise KeyboardInterrupt
        done.append(1)
        return train_step(*args, **kw)

    monkeypatch.setattr(finetune, "train", functools.partial(train, step_fn=interrupted_step))
    with pytest.raises(KeyboardInterrupt):
        run_finetuning(tiny_run, "resumed", **settings)
    monkeypatch.undo()
    resumed, resumed_log = run_finetuning(tiny_run, "resumed", resume=True, **settings)

    a = torch.load(full / "run" / "adapter.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "run" / "adapter.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in resumed_log] == list(range(1, 8))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in full_log]
    full_evals, resumed_evals = (read_log(out / "reports" / "eval_log.jsonl") for out in (full, resumed))
    assert [r["step"] for r in full_evals] == [0, 3, 6, 7] and resumed_evals == full_evals
    summary = json.loads((full / "reports" / "summary.json").read_text())
    assert summary["data"]["examples"] == 4 and len(summary["data"]["heldout_records"]) == 2
    assert summary["result"]["heldout_loss_last"] == full_evals[-1]["loss"]
    samples = json.loads((full / "reports" / "samples.json").read_text())
    assert [s["set"] for s in samples[-2:]] == ["held out", "held out"]


def test_resume_refuses_other_settings(tiny_run):
    run_finetuning(tiny_run, "changed", max_steps=2)
    with pytest.raises(UserError, match="lr"):
        run_finetuning(tiny_run, "changed", max_steps=3, lr=1e-3, resume=True)


def test_resume_refuses_other_lora_settings(tiny_run):
    run_finetuning(tiny_run, "rank", max_steps=2)
    with pytest.raises(UserError, match="other trainable weights"):
        run_finetuning(tiny_run, "rank", max_steps=3, lora_targets="wq,wk,wv", resume=True)


def test_save_merged_writes_a_checkpoint_that_equals_base_plus_adapter(tiny_run):
    from llama.checkpoint import load_checkpoint
    from project.model.lora import load_adapter

    out, _ = run_finetuning(tiny_run, "merged", max_steps=2, save_merged=str(tiny_run[2] / "merged" / "model"))
    merged, _ = load_checkpoint(out / "model", torch.float32, "cpu")
    base, _ = load_checkpoint(tiny_run[0], torch.float32, "cpu")
    apply_lora(base, LoRAConfig())
    load_adapter(base, out / "run" / "adapter.pt")
    assert any(m.lora_B.abs().sum() > 0 for m in base.modules() if hasattr(m, "lora_B"))  # it did train
    ids = torch.tensor([[5, 40, 80, 120, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), base.eval()(ids), rtol=1e-5, atol=1e-5)


def test_export_peft_writes_the_adapter_in_peft_format(tiny_run):
    out, _ = run_finetuning(tiny_run, "peft", max_steps=1, export="peft")
    config = json.loads((out / "run" / "peft_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    assert (out / "run" / "peft_adapter" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("lora", [True, False])
def test_export_hf_and_gguf_equal_the_trained_model(tiny_run, lora):
    """The merged HF folder and the GGUF (f32) give the logits of base + trained adapter (or of the fully
    fine-tuned model); `python -m project.export` writes the same files again from the finished run."""
    from llama.checkpoint import load_checkpoint
    from project import export
    from project.model.lora import load_adapter

    name = f"export-{lora}"
    out, _ = run_finetuning(tiny_run, name, max_steps=2, lora=lora, export="hf,gguf", gguf_type="f32")
    if lora:
        expected, _ = load_checkpoint(tiny_run[0], torch.float32, "cpu")
        load_adapter(apply_lora(expected, LoRAConfig()), out / "run" / "adapter.pt")
    else:
        expected, _ = load_checkpoint(out / "run" / "model", torch.float32, "cpu")
    ids = torch.tensor([[5, 40, 80, 120, 7, 9]])
    with torch.no_grad():
        want = expected.eval()(ids)
        assert (want - load_checkpoint(tiny_run[0], torch.float32, "cpu")[0](ids)).abs().max() > 1e-3  # it trained
        for path in (out / "run" / "hf", out / "run" / "model.gguf"):
            got, tok = load_checkpoint(path, torch.float32, "cpu")
            torch.testing.assert_close(got(ids), want, rtol=1e-5, atol=1e-5)
            assert tok.encode("Say hi.") == list(b"Say hi.") and tok.eos_id == 256
    (out / "run" / "model.gguf").unlink()
    export.main(run_dir=str(out / "run"), formats="gguf", ckpt_dir=str(tiny_run[0]), gguf_type="f32")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out / "run" / "model.gguf", torch.float32, "cpu")[0](ids), want)


def test_export_flags_are_checked_before_training(tiny_run):
    with pytest.raises(UserError, match="--export takes any of"):
        run_finetuning(tiny_run, "bad-export", export="onnx")
    with pytest.raises(UserError, match="needs --lora True"):
        run_finetuning(tiny_run, "bad-export", export="peft", lora=False)
    with pytest.raises(UserError, match="full-precision base"):
        run_finetuning(tiny_run, "bad-export", export="gguf", base="int8")
    with pytest.raises(UserError, match="--gguf_type"):
        run_finetuning(tiny_run, "bad-export", export="gguf", gguf_type="q4")
    assert not (tiny_run[2] / "bad-export" / "reports" / "train_log.jsonl").exists()


def test_train_config_rejects_bad_values():
    for bad in (dict(precision="fp8"), dict(optimizer="lion"), dict(grad_accum=0), dict(max_steps=0), dict(lr=0)):
        with pytest.raises(UserError):
            TrainConfig(**bad)


def test_cli_bad_data_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": ""}]))
    cmd = [sys.executable, "finetuning.py", "--data", str(bad), "--on_bad_record", "stop"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: record 0 ")
    assert "Traceback" not in proc.stderr
