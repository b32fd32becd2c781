"""The CUDA path on a real GPU (tests marked `cuda`, skipped where PyTorch sees no GPU), and what can be checked
of it on CPU: the dtype choice of GPUs without bf16 (a P100), simulated, and Table 3's CUDA columns.

    pytest -m cuda tests/test_cuda.py      # on a GPU machine (`make gpu-check` runs it first)

Each GPU test compares with a reference found another way: the CPU's tokens and fp32 loss, byte counts worked
out by hand, the allocator's own counters, an allocation larger than the GPU.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ToyTokenizer, run_script, tiny_model
from tiny_finetune import PAD, RECORDS, byte_tokenizer
from tiny_finetune import tiny_model as tiny_train_model

from llama import runtime
from llama.generation import Llama
from llama.model import fuse_projections
from project.bench import gpu_check
from project.bench.finetune.report import table3_section
from project.bench.harness import child_main
from project.bench.inference.measure import measure
from project.data import IGNORE_INDEX, build_dataset, collate
from project.memory import MiB, PeakMemory, memory_in_use, memory_timeline, parameter_bytes
from project.model.lora import LoRAConfig, apply_lora
from project.quant import Int4Linear, QuantConfig, kernel_for, quantize
from project.train import NextTokenLoss, make_scaler, train_step

CUDA = torch.device("cuda")
NO_GPU = f"needs a CUDA GPU: this PyTorch ({torch.__version__}) sees none; `make gpu-check` runs it on a GPU machine"


def gpu(test):
    """Mark a test `cuda`, and skip it, saying why, where this PyTorch sees no CUDA GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)(test))


# ---- generation ----------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 8, 1], [200, 13], [9, 9, 31, 64, 77]]  # unequal: the batch is left-padded
GEN = 16


@gpu
def test_cuda_fp32_greedy_with_and_without_cache_single_and_batched_equals_cpu():
    """CUDA, fp32: greedy tokens with the KV cache on and off, one prompt at a time and all in one left-padded
    batch (SDPA's CUDA kernels with the padding mask), each equal to the CPU's fp32 tokens."""
    cpu = Llama(tiny_model(seed=5), ToyTokenizer(), torch.device("cpu"))
    reference = [cpu.generate([p], GEN).tokens[0] for p in PROMPTS]
    assert len({t for row in reference for t in row}) > 10  # the random model does not repeat one token
    llama = Llama(tiny_model(seed=5).to(CUDA), ToyTokenizer(), CUDA)
    for cache in (True, False):
        assert [llama.generate([p], GEN, use_kv_cache=cache).tokens[0] for p in PROMPTS] == reference, cache
        assert llama.generate(PROMPTS, GEN, use_kv_cache=cache).tokens == reference, cache


@gpu
def test_cuda_compiled_decode_equals_cpu():
    """CUDA, fp32: the decode step compiled by torch.compile (inductor's GPU kernels, fused projections, the static
    cache) gives the CPU's plain greedy tokens, single prompts and a left-padded batch."""
    import torch._dynamo

    cpu = Llama(tiny_model(seed=5), ToyTokenizer(), torch.device("cpu"))
    reference = [cpu.generate([p], GEN).tokens[0] for p in PROMPTS]
    torch._dynamo.reset()
    compiled = Llama(fuse_projections(tiny_model(seed=5)).to(CUDA), ToyTokenizer(), CUDA, compile=True)
    assert [compiled.generate([p], GEN).tokens[0] for p in PROMPTS] == reference
    assert compiled.generate(PROMPTS, GEN).tokens == reference


# ---- training steps ------------------------------------------------------------------------------------------
def lora_model() -> torch.nn.Module:
    """The tiny fp32 model with LoRA on wq and wv, on CPU."""
    return apply_lora(tiny_train_model(), LoRAConfig(r=4, alpha=8.0, dropout=0.0))


def batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two hand-made records of different lengths, right-padded: (input_ids, labels), each (2, T)."""
    ids, labels = collate(build_dataset(RECORDS[:2], byte_tokenizer(), max_seq_len=512).examples, PAD)
    return ids.to(device), labels.to(device)


def cpu_fp32_loss(model, ids, labels) -> float:
    """Mean next-token cross-entropy over the label tokens, from the full logits with torch's own loss."""
    with torch.no_grad():
        logits = model(ids).float()[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX).item()


@gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_steps_lower_the_loss(precision):
    """CUDA, fp16 autocast with a GradScaler / bf16 autocast without one: the first step's loss equals the CPU's
    fp32 loss to 16-bit accuracy, six steps on the same batch lower it, and the weights stay fp32."""
    if precision == "bf16" and not runtime.cuda_has_bf16(CUDA):
        pytest.skip(f"{torch.cuda.get_device_name(CUDA)} has no bf16 arithmetic")
    model = lora_model()
    expected = cpu_fp32_loss(model, *batch("cpu"))
    model.to(CUDA)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scaler = make_scaler(CUDA, precision)
    assert scaler.is_enabled() == (precision == "fp16")
    losses = [train_step(NextTokenLoss(model), [batch(CUDA)], opt, scaler, precision).loss for _ in range(6)]
    assert losses[0] == pytest.approx(expected, rel=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@gpu
def test_cuda_fp16_overflowing_step_is_skipped():
    """CUDA, fp16: with a loss scale of 2^100 the backward overflows fp16; the step is reported skipped, no weight
    moves and the scale halves. With a sane scale the next step moves the weights."""
    model = lora_model()
    with torch.no_grad():  # non-zero B so that every adapter gets a gradient
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.fill_(0.01)
    model.to(CUDA)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**100)
    result = train_step(NextTokenLoss(model), [batch(CUDA)], opt, scaler, "fp16")
    assert result.skipped and scaler.get_scale() == 2.0**99
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not train_step(
        NextTokenLoss(model), [batch(CUDA)], opt, torch.amp.GradScaler("cuda", init_scale=2.0**8), "fp16"
    ).skipped
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


# ---- the benchmarks' meters and statuses ---------------------------------------------------------------------
@gpu
def test_cuda_peak_figures_are_max_memory_allocated_around_a_known_allocation():
    """CUDA, uint8: 64 MiB made and freed inside a measured generate call raise the inference benchmark's peak
    to exactly what was allocated before + 64 MiB, which is torch.cuda.max_memory_allocated; PeakMemory (the
    fine-tuning benchmark's meter) resets at entry, so a later block with 16 MiB sees 16 MiB."""
    held = torch.ones(MiB, device=CUDA)  # 4 MiB allocated before: the peak counts from them
    gc.collect()  # earlier tests' garbage, which measure's own gc.collect would free inside the measurement
    before = torch.cuda.memory_allocated(CUDA)
    assert memory_in_use(CUDA) == before

    def generate_once(n_new: int) -> dict:
        torch.empty(64 * MiB, dtype=torch.uint8, device=CUDA).fill_(1)
        return {}

    (run,) = measure(generate_once, CUDA, warmup=0, repeats=1, n_new=1)
    assert run["peak_bytes"] == before + 64 * MiB == torch.cuda.max_memory_allocated(CUDA)
    assert run["peak_reserved_bytes"] >= run["peak_bytes"]
    with PeakMemory(CUDA) as peak:
        torch.zeros(16 * MiB, dtype=torch.uint8, device=CUDA)
    assert peak.peak == peak.allocated == before + 16 * MiB
    del held


@gpu
def test_cuda_out_of_memory_is_recorded_as_OOM(tmp_path, monkeypatch):
    """CUDA: a benchmark child (harness.child_main) whose allocation is twice the GPU's memory records status OOM
    with the GPU's name, instead of crashing; the GPU is usable afterwards."""
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"device": "cuda"}))
    monkeypatch.setattr(sys, "argv", ["child", str(spec), str(result)])
    too_much = 2 * torch.cuda.get_device_properties(CUDA).total_memory
    child_main(lambda spec, result: torch.empty(too_much, dtype=torch.uint8, device=CUDA))
    recorded = json.loads(result.read_text())
    assert recorded["status"] == "OOM" and recorded["message"].startswith("OutOfMemoryError"), recorded
    assert recorded["device_name"] == torch.cuda.get_device_name(CUDA)
    assert torch.ones(2, device=CUDA).sum().item() == 2


@gpu
def test_cuda_memory_timeline_sees_parameters_and_gradients():
    """CUDA, fp32: the profiler's timeline of one training step (the fine-tuning benchmark's timeline plot) holds
    gradients as large as the parameters."""
    model = tiny_train_model().to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (1, 16), device=CUDA)

    def step():
        model(ids).float().sum().backward()
        opt.step()

    timeline = memory_timeline(step, CUDA)
    peak = {c: max(row[i] for row in timeline["bytes"]) for i, c in enumerate(timeline["categories"])}
    assert peak["gradient"] >= parameter_bytes(model) * 0.9


# ---- quantized inference ----------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize(("n_out", "n_in", "group_size"), [(64, 128, 32), (960, 576, 32), (256, 512, 128)])
def test_cuda_int4_tinygemm_matches_the_dequantized_fallback(n_out, n_in, group_size):
    """CUDA, bf16: on sm80+ the int4 layer runs the tinygemm kernel (576 input columns: 4 inner k-tiles), and its
    outputs agree with the plain layout's dequantize-then-matmul; the weights the kernel multiplies by (read back
    through the identity) are the fallback's, level for level, which a wrong nibble order would break."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability 8.0 or later")
    torch.manual_seed(0)
    base = torch.nn.Linear(n_in, n_out, bias=False).to(CUDA, torch.bfloat16)
    fast, plain = Int4Linear(base, group_size, "tinygemm"), Int4Linear(base, group_size, "dequantize")
    assert fast.kernel == "tinygemm" and fast.q.numel() * fast.q.element_size() == n_out * n_in // 2
    # In fp32 the two differ only by the kernel's bf16 rounding; a misplaced level is off by a step (~range / 15).
    torch.testing.assert_close(fast.dequantize(), plain.dequantize(), rtol=1e-2, atol=1e-3)
    x = torch.randn(3, 5, n_in, device=CUDA, dtype=torch.bfloat16)
    y, ref = fast(x).float(), plain(x).float()
    assert y.shape == (3, 5, n_out)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@gpu
@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_cuda_quantized_model_generates_the_same_with_and_without_cache(mode):
    """CUDA, fp32 model: a quantized tiny model (int4 through tinygemm on sm80+, its activations in bf16; w8a8's levels
    multiplied in floating point) says which
    kernel it uses, and its greedy tokens are the same with the KV cache on and off, one prompt at a time and
    batched."""
    model = tiny_model(seed=5).to(CUDA)
    text = quantize(model, QuantConfig(mode))
    assert kernel_for(CUDA, mode) in text
    llama = Llama(model, ToyTokenizer(), CUDA)
    on = [llama.generate([p], GEN, use_kv_cache=True).tokens[0] for p in PROMPTS]
    assert [llama.generate([p], GEN, use_kv_cache=False).tokens[0] for p in PROMPTS] == on
    assert llama.generate(PROMPTS, GEN).tokens == on


# ---- on CPU: what a GPU would choose, and how its figures are shown -------------------------------------------
@pytest.mark.parametrize(
    ("gpu_name", "capability", "expected"),
    [
        ("P100", (6, 0), torch.float16),
        ("V100", (7, 0), torch.float16),
        ("A100", (8, 0), torch.bfloat16),
        ("H100", (9, 0), torch.bfloat16),
    ],
)
def test_simulated_cuda_auto_dtype_is_bf16_only_with_bf16_arithmetic(monkeypatch, gpu_name, capability, expected):
    """CPU, simulated CUDA device: dtype auto (inference, the precision of fine-tuning and the benchmarks' mixed
    precision) is fp16 on a P100 (compute capability 6.0) or V100 (7.0), where torch.cuda.is_bf16_supported()
    still says yes (bf16 tensors can be made there, not computed), and bf16 from Ampere (8.0) on."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.low_precision_dtype(CUDA) == expected
    assert runtime.resolve_dtype("auto", CUDA) == expected
    assert runtime.has_native_matmul(CUDA, torch.bfloat16) == (expected == torch.bfloat16)
    assert runtime.has_native_matmul(CUDA, torch.float16)


@pytest.mark.parametrize(
    ("capability", "expected"), [((6, 0), "dequantize"), ((8, 0), "tinygemm"), ((9, 0), "tinygemm")]
)
def test_simulated_cuda_int4_kernel_is_tinygemm_from_sm80_for_inference_only(monkeypatch, capability, expected):
    """CPU, simulated CUDA device: int4 inference takes the tinygemm kernel from compute capability 8.0 on (it
    exists in every PyTorch build: the op, not the GPU, is what hasattr sees); training and int8 never do."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kernel_for(CUDA, "int4") == expected
    assert kernel_for(CUDA, "int4", training=True) == "dequantize" and kernel_for(CUDA, "int8") == "dequantize"


def test_table3_on_cuda_shows_allocated_and_reserved_peaks():
    """CPU, rows as the fine-tuning benchmark writes them on CUDA: Table 3's peak column is max allocated /
    max reserved (no resident-memory columns), and an OOM configuration shows as such."""
    common = dict(stack="ours", device="cuda", grad_ckpt=False, lora=False, grad_accum=1, base="fp32")
    ok = dict(
        common,
        config="amp",
        amp=True,
        precision="fp16",
        status="ok",
        peak_allocated_bytes=1.5 * 2**30,
        peak_reserved_bytes=2 * 2**30,
        peak_bytes=1.5 * 2**30,
        step_s_mean=0.5,
        step_s_std=0.01,
        micro_s_mean=0.5,
        micro_s_std=0.01,
        micro_batches=2,
        tokens_per_s=400.0,
    )
    oom = dict(common, config="vanilla", amp=False, precision="fp32", status="OOM")
    text = "\n".join(table3_section(pd.DataFrame([oom, ok])))
    assert "Peak allocated / reserved" in text and "Peak RSS" not in text and "Above idle" not in text
    assert "| 2 amp | × | ✓ fp16 | × | × 1 | fp32 (master) | 1.50 GiB / 2.00 GiB | 0.500 ± 0.010 |" in text
    assert "| 1 vanilla |" in text and "OOM (×)" in text
    assert "torch.cuda.max_memory_allocated" in text


# ---- make gpu-check, on CPU ----------------------------------------------------------------------------------
def test_gpu_check_plan_leaves_out_what_is_missing_and_says_why():
    """CPU: on a GPU without bf16, without transformers and without the records, gpu-check runs the tests, the
    quantized decode and Table 1 in fp16 without --compare hf, and lists bf16, --compare hf and Table 3 as skipped, with why."""
    missing = {"transformers": "transformers is not installed", "data": "no records"}
    steps, skipped = gpu_check.plan(bf16=False, missing=missing)
    assert [s.name for s in steps] == ["cuda_tests", "quant_decode", "table1_fp16"]
    assert all("--compare" not in s.cmd and s.cmd[s.cmd.index("--dtype") + 1] == "fp16" for s in steps[1:])
    assert skipped == [
        "--compare hf: transformers is not installed",
        "Table 1 in bf16: this GPU has no bf16 arithmetic (compute capability below 8.0)",
        "table3: no records",
    ]


def test_gpu_check_dry_run_flags_exist_in_the_benchmark_scripts():
    """CPU: every flag of every step is one its script takes (the dry run checks them against the signatures)."""
    proc = run_script("-m", "project.bench.gpu_check", "--dry_run", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [
        "cuda_tests",
        "quant_decode",
        "table3",
        "table1_bf16",
        "table1_fp16",
    ]
    assert "--configs vanilla,ckpt,amp,lora,ckpt+amp,ckpt+lora,amp+lora,ckpt+amp+lora --examples 2" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_refuses_without_cuda_in_one_line():
    proc = run_script("-m", "project.bench.gpu_check", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu-check: no CUDA GPU")


def test_gpu_check_stops_a_step_and_its_children_at_the_limit(tmp_path):
    """CPU: a step over its limit is stopped with the process it started (a benchmark's child), not only itself."""
    flag = tmp_path / "grandchild_finished"
    grandchild = f"import time, pathlib; time.sleep(2); pathlib.Path({str(flag)!r}).touch()"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    step = gpu_check.Step("slow", [sys.executable, "-c", child], cap_s=1)
    assert gpu_check.run_step(step, 1, tmp_path / "slow.log") == "stopped at its limit of 1 s"
    time.sleep(3)
    assert not flag.exists()
    assert gpu_check.run_step(gpu_check.Step("quick", [sys.executable, "-c", "1"], 5), 5, tmp_path / "q.log") == "ok"
