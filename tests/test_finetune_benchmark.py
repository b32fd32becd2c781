"""The fine-tuning benchmark end to end on a tiny model: CSV rows and columns, the memory breakdown, a
simulated out-of-memory configuration, and Table 2's arrows against the numbers beside them."""

import json
import math
import re

import pandas as pd
import pytest
import torch

from llama.errors import UserError
from project.bench.finetune.configs import select
from project.bench.finetune.report import THRESHOLD, arrow
from tests.conftest import run_script
from tests.tiny_finetune import tiny_args, write_records, write_tiny_checkpoint

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
REQUIRED = [
    "config",
    "stack",
    "status",
    "device",
    "device_name",
    "precision",
    "torch",
    "python",
    "commit",
    "allocator",
    "command",
    "micro_s_mean",
    "micro_s_std",
    "step_s_mean",
    "peak_bytes",
    "peak_rss_bytes",
    "idle_rss_bytes",
    "peak_above_idle_bytes",
    "param_bytes",
    "grad_bytes",
    "optim_bytes",
    "activation_bytes",
    "logits_loss_bytes",
]


def run_bench(folder, *flags, timeout=600):
    """benchmark_finetuning.py with flags on the CPU, on a tiny checkpoint and records written into folder; returns
    its --out folder."""
    ckpt, data, out = write_tiny_checkpoint(folder / "ckpt"), write_records(folder / "records.json"), folder / "out"
    args = ["--ckpt_dir", ckpt, "--data", data, *flags, "--device", "cpu", "--out", out, "--run_dir", folder / "runs"]
    proc = run_script("benchmark_finetuning.py", *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """vanilla, ckpt (made to run out of memory), lora, ckpt+lora and lora on an int4 base, each in its own
    process, on a tiny checkpoint."""
    flags = ["--configs", "vanilla,ckpt,lora,ckpt+lora,lora+int4", "--examples", 2, "--simulate_oom", "ckpt"]
    out = run_bench(tmp_path_factory.mktemp("bench"), *flags, "--timelines", "vanilla", timeout=300)
    return pd.read_csv(out / "measurements.csv"), (out / "README.md").read_text(), out


def test_csv_rows_columns_and_numbers(bench):
    frame, _, _ = bench
    assert list(frame.config) == ["vanilla", "ckpt", "lora", "ckpt+lora", "lora+int4"]  # went on after the OOM
    assert list(frame.status) == ["ok", "OOM", "ok", "ok", "ok"]
    assert list(frame.base) == ["fp32", "fp32", "fp32", "fp32", "int4"]
    assert not [c for c in REQUIRED if c not in frame.columns]
    ok = frame[frame.status == "ok"]
    for col in REQUIRED[11:]:
        assert (ok[col] >= 0).all(), col
    assert (ok.micro_s_mean > 0).all() and (ok.activation_bytes > 0).all()
    assert ok.command.str.contains("benchmark_finetuning.py").all() and ok.torch.notna().all()


def test_breakdown_parts_match_hand_counts_and_fit_in_the_peak(bench):
    frame, _, _ = bench
    a = tiny_args()
    n_params = (
        a.vocab_size * a.dim * 2
        + a.n_layers
        * (a.dim * a.dim * 2 + 2 * a.dim * a.n_kv_heads * a.head_dim + 3 * a.dim * a.hidden_dim + 2 * a.dim)
        + a.dim
    )
    kv = a.n_kv_heads * a.head_dim
    lora_params = a.n_layers * 16 * ((a.dim + a.dim) + (a.dim + kv))  # r 16 on wq (dim->dim) and wv (dim->kv)
    rope = 4 * a.head_dim // 2  # the inv_freq buffer
    vanilla = frame.set_index("config").loc["vanilla"]
    lora = frame.set_index("config").loc["lora"]
    int4 = frame.set_index("config").loc["lora+int4"]
    assert vanilla.param_bytes - rope == vanilla.grad_bytes == 4 * n_params  # fp32, everything trainable
    assert lora.param_bytes - rope == 4 * (n_params + lora_params)
    assert lora.grad_bytes == int4.grad_bytes == 4 * lora_params  # only A and B get gradients
    # int4 base: the block linears (fp32 in `lora`) take at most 1 byte per weight (+ scales) instead of 4.
    block_linears = a.n_layers * (a.dim * a.dim * 2 + 2 * a.dim * kv + 3 * a.dim * a.hidden_dim)
    assert lora.param_bytes - int4.param_bytes >= 4 * block_linears * 0.6
    assert vanilla.optim_bytes == lora.optim_bytes == 0  # SGD without momentum keeps no state
    for row in (vanilla, lora):
        parts = row.param_bytes + row.grad_bytes + row.optim_bytes + row.activation_bytes + row.logits_loss_bytes
        assert parts <= row.peak_bytes


def test_checkpointing_lowers_the_measured_activations(bench):
    """Through the benchmark's own path: every block checkpointed keeps only the 4 block inputs (B, T, dim) fp32
    of each micro-batch for backward, far less than what lora keeps (every block's intermediate tensors)."""
    frame, _, _ = bench
    rows = frame.set_index("config")
    ckpt, lora = rows.loc["ckpt+lora"], rows.loc["lora"]
    assert ckpt.status == "ok" and ckpt.grad_bytes == lora.grad_bytes and ckpt.param_bytes == lora.param_bytes
    assert ckpt.activation_bytes < 0.5 * lora.activation_bytes


def parse_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


def test_table2_arrows_match_the_numbers_beside_them(bench):
    frame, readme, _ = bench
    table = readme.split("## Table 2")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    lora_line = next(line for line in table if line.startswith("| LoRA"))
    cells = dict(zip(header, (c.strip() for c in lora_line.strip("|").split("|"))))
    row = frame.set_index("config").loc["lora"]
    base = frame.set_index("config").loc["vanilla"]
    columns = {
        "Parameters": "param_bytes",
        "Activations": "activation_bytes",
        "Gradients": "grad_bytes",
        "Optimizer state": "optim_bytes",
        "Peak memory": "peak_bytes",
    }
    for label, col in columns.items():
        m = re.fullmatch(r"([↑↓−])(?: ([+-]\d+\.\d)%)? \((.+) → (.+)\)", cells[label])
        assert m, cells[label]
        sign, pct, before, after = m.groups()
        assert parse_bytes(before) == pytest.approx(base[col], rel=0.01, abs=1)
        assert parse_bytes(after) == pytest.approx(row[col], rel=0.01, abs=1)
        change = (row[col] - base[col]) / base[col] if base[col] else (0.0 if row[col] == 0 else math.inf)
        if pct is not None:
            assert float(pct) == pytest.approx(100 * change, abs=0.051)
        expected = "−" if abs(change) < THRESHOLD else ("↑" if change > 0 else "↓")
        assert sign == expected, (label, cells[label])
    assert cells["Gradients"].startswith("↓") and cells["Parameters"].startswith("↑")
    int4_line = next(line for line in table if line.startswith("| int4 frozen base (lora+int4 against lora)"))
    assert int4_line.split("|")[2].strip().startswith("↓")  # parameters shrink


def test_tables_and_plots_written(bench):
    _, readme, out = bench
    table3 = readme.split("## Table 3")[1].split("## Table 2")[0]
    assert re.search(r"\| 2 ckpt \| ✓ \| × \| × \|.*OOM \(×\)", table3)
    assert "| 1 vanilla |" in table3 and "| 3 lora |" in table3
    for name in ("peak_and_time.png", "memory_breakdown.png", "timeline.png", "timeline_ours_vanilla.json"):
        assert (out / name).stat().st_size > 0
    assert "device" in readme and "torch" in readme and "python benchmark_finetuning.py" in readme


def test_arrow_threshold_by_hand():
    assert arrow(100, 104.9)[0] == "−" and arrow(100, 95.1)[0] == "−"
    assert arrow(100, 105)[0] == "↑" and arrow(100, 95)[0] == "↓"
    assert arrow(0, 0) == ("−", 0.0) and arrow(0, 1)[0] == "↑"


def test_configuration_names():
    assert [c.name for c in select(None)] == [
        "vanilla",
        "ckpt",
        "amp",
        "lora",
        "ckpt+amp",
        "ckpt+lora",
        "amp+lora",
        "ckpt+amp+lora",
        "accum8",
        "ckpt+amp+lora+accum8",
        "lora+bf16",
        "lora+int8",
        "lora+int4",
        "ckpt+amp+lora+int4",
    ]
    with pytest.raises(UserError, match="unknown configuration"):
        select("vanilla,fast")


@pytest.mark.slow
def test_compare_hf_runs_both_stacks(tmp_path):
    flags = ["--configs", "vanilla,ckpt+amp+lora", "--examples", 2, "--compare", "hf", "--timelines", ""]
    out = run_bench(tmp_path, *flags, "--emulated_amp")
    frame = pd.read_csv(out / "measurements.csv")
    assert list(zip(frame.config, frame["stack"], frame.status)) == [
        ("vanilla", "ours", "ok"),
        ("vanilla", "hf", "ok"),
        ("ckpt+amp+lora", "ours", "ok"),
        ("ckpt+amp+lora", "hf", "ok"),
    ]
    hf = frame[frame["stack"] == "hf"].set_index("config")
    ours = frame[frame["stack"] == "ours"].set_index("config")
    # Same weights: the same gradient bytes (full: every parameter; LoRA on q, v: the adapters), and the same
    # weight bytes but for the rotary buffers (HF keeps a second copy of inv_freq).
    assert hf.loc["vanilla"].grad_bytes == ours.loc["vanilla"].grad_bytes
    assert hf.loc["vanilla"].param_bytes == pytest.approx(ours.loc["vanilla"].param_bytes, abs=64)
    assert hf.loc["ckpt+amp+lora"].grad_bytes == ours.loc["ckpt+amp+lora"].grad_bytes
    assert "Peak ours/HF" in (out / "README.md").read_text()


def test_mixed_precision_is_skipped_where_the_cpu_only_emulates_it(tmp_path, monkeypatch):
    """On a CPU without native bf16 the sweep records amp as skipped, runs no child for it, and goes on."""
    import benchmark_finetuning
    from project.bench.finetune import sweep

    monkeypatch.setattr(sweep, "has_native_matmul", lambda device, dtype: dtype != torch.bfloat16)
    ckpt, data, out = (
        write_tiny_checkpoint(tmp_path / "ckpt"),
        write_records(tmp_path / "records.json"),
        tmp_path / "out",
    )
    benchmark_finetuning.main(
        configs="amp,lora",
        ckpt_dir=str(ckpt),
        data=str(data),
        examples=1,
        timelines=(),
        device="cpu",
        out=str(out),
        run_dir=str(tmp_path / "runs"),
    )
    frame = pd.read_csv(out / "measurements.csv")
    assert list(zip(frame.config, frame.status)) == [("amp", "skipped"), ("lora", "ok")]
    assert "--emulated_amp" in frame.message[0]
    assert not (tmp_path / "runs" / "ours-amp.spec.json").exists()
    assert "skipped (×)" in (out / "README.md").read_text()


def test_compute_floor_by_hand():
    """1B shape, LoRA, 120 tokens in 2 micro-batches, fp32 at 0.1 TFLOP/s: 16 layers x (2 x 2048^2 + 2 x 2048 x 512
    + 3 x 2048 x 8192) = 973,078,528 matmul weights; x 4 FLOPs (forward + input gradients) x 60 tokens = 0.2335
    TFLOP, so 2.34 s; measured 3.0 s is 78% of the rate. Full fine-tuning with checkpointing counts 8 FLOPs."""
    from project.bench.finetune.report import floor_section

    row = dict(stack="ours", status="ok", amp=False, precision="fp32", grad_ckpt=False, lora=True, tokens=120,
               micro_batches=2, micro_s_mean=3.0, model="llama3.2-1b (random weights, seed 0)")  # fmt: skip
    frame = pd.DataFrame([dict(row, config="lora"), dict(row, config="ckpt", lora=False, grad_ckpt=True)])
    lines = floor_section(frame, {"matmul_TFLOP_per_s": {"fp32": 0.1, "bf16": 0.05}})
    assert "| lora | fp32 | 0.234 | 0.1 | 2.34 | 3.00 | 78% |" in lines
    assert "| ckpt | fp32 | 0.467 | 0.1 | 4.67 | 3.00 | 156% |" in lines
    assert "(a compute floor needs" in floor_section(frame.assign(model="my checkpoint"), {"matmul_TFLOP_per_s": {}})[0]
    # The tool's fp32 rate is the default BLAS's: said where ours multiplied through oneDNN instead.
    limits = {"matmul_TFLOP_per_s": {"fp32": 0.1, "bf16": 0.05}}
    assert not any("through oneDNN" in line for line in lines)
    assert any("through oneDNN" in line for line in floor_section(frame.assign(cpu_fp32_matmul="onednn"), limits))


def test_nproc_runs_fsdp_ranks(tmp_path):
    """--nproc 2 --distributed fsdp: every configuration also under torchrun. Two ranks with accumulation 1 train
    the same windows as one process with accumulation 2, so their losses (before and after an update) must agree;
    each rank holds half of the parameters and gradients that the one process holds. (DDP goes through the same
    code; tests/test_distributed.py checks both modes' training.)"""
    flags = ["--configs", "vanilla,accum2", "--grad_accum", 2, "--examples", 2, "--passes", 2, "--timelines", ""]
    # No warm-up: a warm-up step is one micro-batch per process, which would not be the same window on 1 and 2 ranks.
    out = run_bench(tmp_path, *flags, "--warmup", 0, "--nproc", 2, "--distributed", "fsdp")
    frame = pd.read_csv(out / "measurements.csv")
    assert list(zip(frame.config, frame["stack"], frame.ranks, frame.status)) == [
        (config, stack, ranks, "ok") for config in ("vanilla", "accum2") for stack, ranks in (("ours", 1), ("fsdp", 2))
    ]
    rows = frame.set_index(["config", "stack"])
    one_process = rows.loc[("accum2", "ours")]  # windows [ex0, ex1], [ex0, ex1]
    two_ranks = rows.loc[("vanilla", "fsdp")]  # windows [ex0 | ex1] (rank 0 | rank 1), twice
    assert two_ranks.loss_first == pytest.approx(one_process.loss_first, abs=1e-5)
    assert two_ranks.loss_last == pytest.approx(one_process.loss_last, abs=1e-5)
    assert two_ranks.loss_last != pytest.approx(two_ranks.loss_first, abs=1e-6)  # the update did something
    assert two_ranks.tokens == one_process.tokens
    for key in ("param_bytes", "grad_bytes"):
        whole = rows.loc[("vanilla", "ours")][key]
        shards = json.loads(two_ranks[f"{key}_ranks"])
        assert len(shards) == 2 and all(shard == pytest.approx(whole / 2, rel=0.02) for shard in shards)
    # The weights FSDP gathers for a block's forward are parameters, not activations: the two ranks train the one
    # process's two examples between them, and save for backward at most what it saves.
    assert max(json.loads(two_ranks.activation_bytes_ranks)) == rows.loc[("vanilla", "ours")].activation_bytes
    report = (out / "README.md").read_text()
    assert "## Several processes (torchrun)" in report and "| vanilla | fsdp | 2 |" in report
