"""The report builder: numbers come from the code and from the results files, and every PDF is produced.

The fixtures write the results files in the project's own formats, through the code that writes them for real:
results.csv via project.bench.inference.results (and report.md / plots via its report.py), the fine-tuning run's
folder via project.reports.finetune_run.write_run_report, measurements.csv with the benchmark's column names (and
its README.md / plots via write_report). Expected cells are worked out by hand from the inputs below.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from llama.checkpoint import REPO_ROOT
from project.bench.finetune.report import write_report
from project.bench.inference import report as inference_report
from project.bench.inference import results as inference_results
from project.bench.inference.config import Spec
from project.model.lora import LoRAConfig
from project.quant import QuantConfig
from project.reports import phase1, phase2, phase3
from project.reports.build import build_all
from project.reports.finetune_run import write_run_report
from project.train import TrainConfig, read_log

ENV = {"commit": "abc1234", "torch": "2.x", "python": "3.x", "fpdf2": "2.x", "machine": "test"}
MiB = 2**20


# ---- the inference benchmark's folder: results.csv, summary.csv, report.md, vs_batch_size.png ---------------
BASELINE_MIB = 700
INFERENCE_RUNS = {  # (batch, kv cache) -> repeats of (wall_s, peak MiB); batch 16 without the cache is OOM
    (1, True): [(1.25, 812), (1.31, 815), (1.22, 813)],
    (1, False): [(3.10, 790), (3.30, 792), (3.20, 791)],
    (8, True): [(2.10, 901), (2.20, 905), (2.00, 903)],
    (8, False): [(9.50, 1404), (9.70, 1410), (9.60, 1407)],
    (16, True): [(3.50, 1001)],
}
INFERENCE_META = {
    "model": "tiny",
    "device": "cpu",
    "device_name": "test cpu",
    "dtype": "bf16",
    "threads": 2,
    "torch_version": "2.x",
    "commit": "feed123",
}


def inference_done(runs: dict = INFERENCE_RUNS) -> list[tuple[Spec, dict]]:
    """(spec, child result) pairs as the sweep collects them; batch 8 without the cache generates other tokens."""
    done = []
    for b in (1, 8, 16):
        for kv in (True, False):
            spec = Spec(
                "ours", kv, b, input_len=256, output_len=32, device="cpu", dtype="bf16", threads=2, repeats=3, warmup=1
            )
            if (b, kv) not in runs:
                done.append((spec, {"status": "OOM", "message": "simulated"}))
                continue
            sha = "other" if (b, kv) == (8, False) else f"sha{b}"
            done.append(
                (
                    spec,
                    {
                        "status": "ok",
                        "prompt": [1, 2, 3],
                        "weights_bytes": 500 * MiB,
                        "baseline_bytes": BASELINE_MIB * MiB,
                        "runs": [
                            {
                                "repeat": i,
                                "wall_s": w,
                                "prefill_s": w / 4,
                                "decode_s": w * 3 / 4,
                                "peak_bytes": p * MiB,
                                "peak_reserved_bytes": 0,
                                "kv_cache_bytes": 6635520 * b if kv else 0,
                                "n_generated": 32,
                                "tokens_sha": sha,
                                "peak_reset": True,
                            }
                            for i, (w, p) in enumerate(runs[b, kv])
                        ],
                    },
                )
            )
    return done


def write_inference(folder: Path, runs: dict = INFERENCE_RUNS, report_too: bool = True):
    """What benchmark_inference.py writes: results.csv, and from it summary.csv, the plots and report.md."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        inference_results.rows(inference_done(runs), INFERENCE_META), columns=inference_results.CSV_COLUMNS
    )
    inference_results.write_csv(frame, folder / "results.csv")
    if report_too:
        summary = inference_results.summarize(pd.read_csv(folder / "results.csv"))
        inference_results.write_csv(summary, folder / "summary.csv")
        meta = dict(
            INFERENCE_META,
            command="python benchmark_inference.py --batch_sizes 1,8,16",
            date="today",
            transformers_version="",
            repeats=3,
            warmup=1,
            memory_note=inference_report.memory_note("cpu"),
        )
        text = inference_report.report(summary, meta, inference_report.plots(summary, folder))
        (folder / "report.md").write_text(text)


SAMPLES = {  # kv_cache_samples.json as phase2.make_samples writes it
    "model": "tiny",
    "device": "cpu",
    "dtype": "bf16",
    "torch": "2.x",
    "commit": "feed123",
    "max_gen_len": 8,
    "decoding": "greedy",
    "command": "python -m project.reports --samples=run",
    "samples": [
        {
            "prompt": "Say hi.",
            "with_cache": "Hi there!",
            "with_cache_tokens": [5, 6, 7],
            "without_cache": "Hi there!",
            "without_cache_tokens": [5, 6, 7],
            "same_tokens": True,
        }
    ],
}


# ---- the fine-tuning run's folder: what finetuning.py writes ---------------------------------------------------
LOSSES = [2.5, 2.31, 2.2, 2.05, 1.98, 1.9, 1.86, 1.8]


def run_steps() -> list[dict]:
    """train_log.jsonl records as project/train.py writes them: the first step slow (warm-up), 600 tokens each."""
    return [
        {
            "step": i + 1,
            "epoch": (i + 1) / 8,
            "loss": x,
            "label_tokens": 200,
            "tokens": 600,
            "step_s": 3.0 if i == 0 else 1.5,
            "tokens_per_s": 200.0 if i == 0 else 400.0,
            "lr": 1e-5,
            "skipped": False,
            "grad_norm": None,
            "loss_scale": 1.0,
            "memory_bytes": int(1.25 * 2**30) if i == 3 else 2**30,
            "elapsed_s": 3.0 + 1.5 * i,
        }
        for i, x in enumerate(LOSSES)
    ]


def write_finetune_run(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    steps = run_steps()
    (folder / "train_log.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    summary = {  # the dict project/finetune.py builds
        "model": "tiny",
        "data": {"file": "alpaca.json", "examples": 8, "truncated": 0, "dropped": 0, "max_seq_len": 64},
        "lora": asdict(LoRAConfig(r=4)),
        "trainable_params": 4608,
        "total_params": 1_000_000,
        "grad_ckpt": {"policy": "none", "blocks": 0, "of": 2},
        "training": asdict(TrainConfig(max_steps=8)),
        "device": "cpu",
        "device_name": "test cpu",
        "threads": 2,
        "allocator": "glibc defaults",
        "versions": {"python": "3.x", "torch": "2.x", "numpy": "1.x"},
        "command": "python finetuning.py --max_steps 8",
    }
    samples = [
        {"instruction": "Name a colour.", "set": "trained on", "before": "colour colour", "after": "Blue."},
        {"instruction": "Say hi.", "set": "held out", "before": "hi hi hi", "after": "Hi!"},
    ]
    for sample, before, after in zip(samples, (True, False), (True, True)):  # ended with EOS within the limit?
        sample.update(before_stopped=before, after_stopped=after)
    write_run_report(folder, summary, steps, samples)


# ---- the fine-tuning benchmark's folder: measurements.csv (+ README.md and plots) -------------------------------
BENCH = {  # config -> (grad_ckpt, amp, lora, grad_accum, step_s, peak, param, grad, optim, activation), sizes in MiB
    "vanilla": (False, False, False, 1, 10.0, 9000, 4700, 4700, 0, 1500),
    "ckpt": (True, False, False, 1, 13.0, 7700, 4700, 4700, 0, 200),
    "amp": (False, True, False, 1, 6.0, 8400, 4700, 4700, 0, 800),
    "lora": (False, False, True, 1, 4.0, 5100, 4707, 7, 0, 1450),
    "ckpt+amp+lora": (True, True, True, 1, None, None, None, None, None, None),  # OOM
    "accum8": (False, False, False, 8, 80.0, 9050, 4700, 4700, 0, 1520),
}
IDLE_MIB = 4000


def bench_row(config: str, stack: str = "ours", **changes) -> dict:
    """One measurements.csv row, with the column names project/bench/finetune/sweep.py and child.py write."""
    c, a, l, acc, step, peak, par, grad, opt, act = BENCH[config]
    row = {
        "config": config,
        "stack": stack,
        "grad_ckpt": c,
        "amp": a,
        "lora": l,
        "grad_accum": acc,
        "precision": "bf16" if a else "fp32",
        "master_weights": "fp32",
        "device": "cpu",
        "model": "tiny",
        "status": "ok" if step else "OOM",
        "device_name": "test cpu",
        "threads": 2,
        "torch": "2.x",
        "allocator": "MALLOC_TOP_PAD_=1",
        "commit": "feed123",
        "command": "python benchmark_finetuning.py --examples 2",
    }
    if step:
        row.update(
            micro_batches=2 * acc,
            optimizer_steps=2,
            step_s_mean=step,
            step_s_std=0.5,
            micro_s_mean=step / acc,
            micro_s_std=0.1,
            tokens_per_s=242 / step,
            peak_bytes=peak * MiB,
            peak_rss_bytes=peak * MiB,
            peak_above_idle_bytes=(peak - IDLE_MIB) * MiB,
            param_bytes=par * MiB,
            grad_bytes=grad * MiB,
            optim_bytes=opt * MiB,
            activation_bytes=act * MiB,
            logits_loss_bytes=74 * MiB,
        )
    row.update(changes)
    return row


def write_bench(folder: Path, rows: list[dict], report_too: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "measurements.csv", index=False)
    if report_too:
        write_report(folder / "measurements.csv", folder)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every input folder, written once (plots take a few seconds); tests get a copy."""
    root = tmp_path_factory.mktemp("made")
    write_inference(root / "inference")
    (root / "inference" / "kv_cache_samples.json").write_text(json.dumps(SAMPLES))
    write_finetune_run(root / "finetune")
    write_bench(root / "finetune_benchmark", [bench_row(name) for name in BENCH], report_too=True)
    return root


@pytest.fixture
def results(made, tmp_path):
    for name in ("inference", "finetune", "finetune_benchmark"):
        shutil.copytree(made / name, tmp_path / name)
    return {
        "reports": tmp_path / "reports",
        "inference": tmp_path / "inference",
        "finetune": tmp_path / "finetune",
        "bench": tmp_path / "finetune_benchmark",
    }


def table_block(text: str, heading: str) -> list[str]:
    """The lines of the first pipe table after heading."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def table_after(text: str, heading: str, key=None) -> dict[str, list[str]]:
    """The first pipe table after heading as {key(cells): cells}, the header under ''; key defaults to the 1st cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table_block(text, heading)]
    key = key or (lambda cells: cells[0])
    return {("" if i == 0 else key(r)): r for i, r in enumerate(rows) if i != 1}


def phase3_text(results, warnings=None) -> str:
    return phase3.build(
        results["reports"], results["finetune"], results["bench"], ENV, [] if warnings is None else warnings
    )


# ---- Phase 1 -----------------------------------------------------------------------------------------------
def test_phase1_numbers_come_from_the_code_and_match_hand_counts():
    text = phase1.build(ENV, [])
    assert "{{" not in text and "}}" not in text
    # Llama 3.2-1B parameters by hand: embeddings (tied) + 16 blocks + final norm.
    D, L, H, K, d, F_, V = 2048, 16, 32, 8, 64, 8192, 128256
    block = D * H * d + 2 * D * K * d + H * d * D + 3 * D * F_ + 2 * D
    assert f"{V * D + L * block + D:,}" == "1,235,814,400"
    assert "1,235,814,400" in text
    # Cross-entropy by a second code path: torch's cross_entropy on log-probabilities.
    logp = torch.log(torch.tensor([[0.1, 0.7, 0.2]]))
    third = F.cross_entropy(logp, torch.tensor([2])).item()
    second = F.cross_entropy(logp, torch.tensor([1])).item()
    assert f"**{third:.3f} nats**" in text and f"**{second:.3f} nats**" in text
    assert abs(third - 1.609) < 1e-3 and abs(second - 0.357) < 1e-3
    # GQA cache per token: 2 (k, v) x layers x kv heads x head dim x 2 bytes (bf16).
    assert f"{2 * L * K * d * 2 / 1024:g} KiB per token" in text
    assert "32 query heads and 8 key-value heads" in text
    for q in range(1, 14):
        assert f"\n## {q}. " in text, f"question {q} missing"


def test_phase1_links_point_at_the_definitions():
    text = phase1.build(ENV, [])
    links = re.findall(r"\[`([^`]+)` › `([^`]+)`\]\(\.\./([^)#]+)#L(\d+)\)", text)
    assert len(links) >= 15
    for path, symbol, target, line in links:
        assert path == target
        source = (REPO_ROOT / path).read_text().splitlines()[int(line) - 1]
        name = symbol.split(".")[-1]
        assert re.match(rf"\s*(class|def) {name}\b", source), (path, symbol, line, source)


def test_fill_rejects_an_unknown_placeholder():
    with pytest.raises(KeyError):
        phase1.fill("a {{nonexistent_number}} b", {})
    assert phase1.fill("{{x:,}} and {{y:.2f}}", {"x": 1234567, "y": 0.5}) == "1,234,567 and 0.50"


# ---- Phase 2 -----------------------------------------------------------------------------------------------
# Table 1 by hand from INFERENCE_RUNS: medians; above weights = peak - 700 MiB; tokens/s = batch x 32 / runtime.
TABLE1 = {
    "peak memory (MiB)": (["813", "903", "1,001"], ["791", "1,407", "× (OOM)"]),
    "peak above weights (MiB)": (["113", "203", "301"], ["91", "707", "× (OOM)"]),
    "runtime (s)": (
        ["1.25 (1.22–1.31)", "2.10 (2.00–2.20)", "3.50"],
        ["3.20 (3.10–3.30)", "9.60 (9.50–9.70)", "× (OOM)"],
    ),
    "tokens/s": (["25.6", "121.9", "146.3"], ["10.0", "26.7", "× (OOM)"]),  # 32/1.25, 256/2.1, 512/3.5; 32/3.2, 256/9.6
}


def table1_cells(text: str) -> dict[tuple[str, str], list[str]]:
    """{(cache on/off, measure): cells per batch size} of the first Table 1 after the phase 2 heading."""
    out, kv = {}, None
    for line in table_block(text, "## Table 1")[2:]:
        head, name, *cells = [c.strip() for c in line.strip().strip("|").split("|")]
        kv = {"**with KV cache**": "on", "**without KV cache**": "off"}.get(head, kv)
        out[(kv, name)] = cells
    return out


def test_phase2_table1_cells_come_from_the_csv(results):
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, warnings := [])
    assert warnings == []
    assert table_block(text, "## Table 1")[0] == "| KV cache | | batch 1 | batch 8 | batch 16 |"
    cells = table1_cells(text)
    for name, (on, off) in TABLE1.items():
        assert cells["on", name] == on and cells["off", name] == off, name
    assert cells["off", "**runtime without ÷ with cache**"] == ["2.56×", "4.57×", "–"]  # 3.20/1.25, 9.60/2.10
    assert cells["off", "same tokens with and without cache"] == ["yes", "no", "–"]
    assert "(4.6× slower)" in text and "(2.6× slower)" in text  # the reading: 9.60/2.10, 3.20/1.25
    assert "the cache itself holds 6.3 MiB" in text  # 6,635,520 bytes at batch 1
    assert "batch 16 without the cache (OOM)" in text
    assert "Hi there!" in text and "identical tokens" in text
    assert "device cpu (test cpu), dtype bf16" in text
    assert "[`report.md`](../inference/report.md)" in text  # where the exact command is
    assert "![vs batch size](../inference/vs_batch_size.png)" in text  # the benchmark's plot, linked


def test_phase2_table1_is_the_benchmark_reports_table(results):
    """One renderer: the phase report's Table 1 is, line for line, the one in the benchmark's report.md."""
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, [])
    bench = (results["inference"] / "report.md").read_text()
    assert table_block(text, "## Table 1") == table_block(bench, "## ours (llama/)")


def test_phase2_changes_when_a_measurement_changes(results):
    runs = dict(INFERENCE_RUNS)
    runs[8, False] = [(19.5, 1404), (19.7, 1410), (19.6, 1407)]
    write_inference(results["inference"], runs, report_too=False)
    cells = table1_cells(phase2.build(results["reports"], results["inference"], "skip", ENV, []))
    assert cells["off", "runtime (s)"][1] == "19.60 (19.50–19.70)"
    assert cells["off", "tokens/s"][1] == "13.1"  # 256 / 19.6


def test_phase2_runtime_versus_output_length(results):
    """A sweep over output lengths gets the benchmark's by_output_len table and the growth sentence."""
    walls = {(32, True): 1.0, (64, True): 2.0, (128, True): 4.0, (32, False): 2.0, (64, False): 6.0, (128, False): 20.0}
    done = []
    for (o, kv), w in walls.items():
        spec = Spec(
            "ours", kv, 1, input_len=16, output_len=o, device="cpu", dtype="bf16", threads=2, repeats=1, warmup=0
        )
        done.append(
            (
                spec,
                {
                    "status": "ok",
                    "prompt": [1],
                    "weights_bytes": 0,
                    "baseline_bytes": 0,
                    "runs": [
                        {
                            "repeat": 0,
                            "wall_s": w,
                            "prefill_s": 0.1,
                            "decode_s": w - 0.1,
                            "peak_bytes": MiB,
                            "peak_reserved_bytes": 0,
                            "kv_cache_bytes": 0,
                            "n_generated": o,
                            "tokens_sha": "s",
                            "peak_reset": True,
                        }
                    ],
                },
            )
        )
    frame = pd.DataFrame(inference_results.rows(done, INFERENCE_META), columns=inference_results.CSV_COLUMNS)
    inference_results.write_csv(frame, results["inference"] / "results.csv")
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, [])
    t = table_after(text, "### Runtime versus output length", key=lambda c: (c[0], c[1]))
    assert t[""] == ["KV cache", "", "32 new", "64 new", "128 new"]
    assert t["**with KV cache**", "runtime (s)"][2:] == ["1.00", "2.00", "4.00"]
    assert t["", "ms per token"][2:] == ["62.5", "93.8", "156.2"]  # without: 1000 x 2/32, 6/64, 20/128
    assert "grows 4.0× with the cache and 10.0× without it" in text  # 4.0/1.0 and 20/2


def test_phase2_quantized_weights_section(results):
    """The weight formats' folder beside Table 1's: a table per format, the quality table, the limits."""
    folder = results["inference"].parent / phase2.QUANT_DIR
    folder.mkdir()
    done = []
    for spec, res in inference_done():
        if spec.kv_cache and res["status"] == "ok":
            done += [(spec, res), (dataclasses.replace(spec, quant=QuantConfig("int8")), res)]
    frame = pd.DataFrame(inference_results.rows(done, INFERENCE_META), columns=inference_results.CSV_COLUMNS)
    inference_results.write_csv(frame, folder / "results.csv")
    pd.DataFrame(
        [
            dict(
                quantize="none",
                dtype="bf16",
                status="ok",
                perplexity=10.0,
                perplexity_change=0.0,
                tokens=500,
                same_prefix_tokens=32.0,
                identical_prompts=4,
                prompts=4,
            ),
            dict(
                quantize="int8",
                dtype="bf16",
                status="ok",
                perplexity=10.05,
                perplexity_change=0.005,
                tokens=500,
                same_prefix_tokens=30.5,
                identical_prompts=3,
                prompts=4,
            ),
        ]  # fmt: skip
    ).to_csv(folder / "quality.csv", index=False)
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, warnings := [])
    section = text[text.index("## Quantized weights") :]
    assert warnings == [] and "### ours (llama/), int8 weights: prompt 256 tokens, 32 new tokens" in section
    assert "| int8 | 10.050 | +0.50% | 30.5 of 32 | 3 of 4 |" in section
    # Without the folder the section says which command makes it, and the rest of the report is unchanged.
    shutil.rmtree(folder)
    assert "**No results yet** for the weight formats" in phase2.build(
        results["reports"], results["inference"], "skip", ENV, []
    )


def test_phase2_course_table_sets_the_1b_run_beside_the_course_p100_figures(results):
    """The 1B-shape folder's cells (ours and hf), MB = MiB x 1.048576, × for a configuration that did not finish,
    and the course's own figures quoted beside them."""
    folder = results["inference"].parent / phase2.TABLE1_1B_DIR
    folder.mkdir()
    done = []
    for spec, res in inference_done():
        done.append((spec, res))
        if spec.kv_cache and res["status"] == "ok":
            done.append((dataclasses.replace(spec, stack="hf"), res))
    frame = pd.DataFrame(inference_results.rows(done, INFERENCE_META), columns=inference_results.CSV_COLUMNS)
    inference_results.write_csv(frame, folder / "results.csv")
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, [])
    section = text[text.index("## Table 1 as the course defines it") : text.index("## Table 1 on the default model")]
    # batch 1, cache on: median wall 1.25 s, median peak 813 MiB = 852.5 MB; the course: 4.54 s, 3230.12 MB
    assert "| on | 1 | 1.25 | 852 | 813 | 1.25 | 4.54 | 3230.12 |" in section
    assert "| off | 16 | × (OOM) | × | × | — | 52.46 | 8641.54 |" in section
    assert "TFLOP of matmuls" in section
    shutil.rmtree(folder)
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, [])
    assert "**No results yet** for the 1B-shape Table 1" in text


def test_missing_results_are_said_plainly(tmp_path):
    text2 = phase2.build(tmp_path, tmp_path / "none", "skip", ENV, warnings2 := [])
    assert "**No results yet** for Table 1" in text2 and "python benchmark_inference.py" in text2
    assert any("results.csv" in w for w in warnings2)
    text3 = phase3.build(tmp_path, tmp_path / "none", tmp_path / "none2", ENV, warnings3 := [])
    assert text3.count("No results yet") >= 4  # the run's summary, its loss log, its samples, the benchmark
    assert "python benchmark_finetuning.py" in text3 and "python finetuning.py" in text3
    assert {w.split()[0].rsplit("/", 1)[-1] for w in warnings3} == {
        "summary.json",
        "train_log.jsonl",
        "samples.json",
        "measurements.csv",
    }


def test_a_file_in_another_format_is_said_plainly(results):
    csv = results["inference"] / "results.csv"
    csv.write_text(csv.read_text().replace("stack,", "engine,", 1))  # an older results.csv
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, warnings := [])
    assert "**No results yet** for Table 1" in text and "lacks the column 'stack'" in text and warnings


# ---- Phase 3 -----------------------------------------------------------------------------------------------
def test_phase3_run_comes_from_summary_log_and_samples(results):
    text = phase3_text(results, warnings := [])
    assert warnings == []
    assert "4,608 trainable parameters of 1,000,000, **0.461 %**" in text
    assert "- **command**: `python finetuning.py --max_steps 8`" in text  # the run's settings, from summary.json
    assert "This run's setting: `none` (0 of 2 blocks)." in text
    # loss_stats by hand: k = 8 // 4 = 2; (2.5 + 2.31) / 2 and (1.86 + 1.8) / 2; steps after the first: 600 / 1.5.
    assert "mean of the first 2 steps 2.4050, of the last 2 steps 1.8300 (-0.5750)" in text
    assert "1.50 s; 400 tokens/s" in text and "(max): 1.25 GiB" in text
    assert "lowest loss 1.8000 at step 8" in text
    t_loss = table_after(text, "## Training loss")
    assert [t_loss[str(i + 1)][1] for i in range(len(LOSSES))] == [f"{x:.4f}" for x in LOSSES]
    assert "| Name a colour. | trained on | colour colour | Blue. |" in text
    assert "| Say hi. | held out | hi hi hi<br>*(no EOS: cut at the token limit)* | Hi! |" in text
    assert "1,703,936" in text and "— the same." in text


def test_phase3_without_the_run_summary(results):
    """Until finetuning.py is rerun there is no summary.json: say so, and still show the log and the samples."""
    (results["finetune"] / "summary.json").unlink()
    text = phase3_text(results, warnings := [])
    assert len(warnings) == 1 and "summary.json does not exist" in warnings[0]
    assert "**No results yet** for the run's summary" in text and "python finetuning.py" in text
    assert table_after(text, "## Training loss")["8"][1] == "1.8000"
    assert "Blue." in text


def test_phase3_table3_cells(results):
    t3 = table_after(phase3_text(results), "### Table 3", key=lambda c: c[0].split()[-1])
    cols = t3[""]
    peak, idle, step = cols.index("Peak RSS"), cols.index("Above idle"), cols.index("Time / optimizer step (s)")
    # Peak RSS in GiB: 9000/1024, 7700/1024, ...; above idle: (peak - 4000 MiB); time: mean ± std.
    assert t3["vanilla"][peak] == "8.79 GiB" and t3["vanilla"][idle] == "4.88 GiB"
    assert t3["vanilla"][step] == "10.000 ± 0.500"
    assert [t3[n][peak] for n in ("ckpt", "amp", "lora", "accum8")] == ["7.52 GiB", "8.20 GiB", "4.98 GiB", "8.84 GiB"]
    assert t3["accum8"][cols.index("Time / micro-batch (s)")] == "10.000 ± 0.100"  # 80 s / 8
    assert t3["accum8"][cols.index("Gradient accumulation")] == "✓ 8"
    assert t3["ckpt+amp+lora"][peak] == "OOM (×)"


def test_phase3_table2_arrows(results):
    text = phase3_text(results)
    t2 = table_after(text, "### Table 2")
    assert t2["Gradient checkpointing (ckpt)"][2] == "↓ -86.7% (1.46 GiB → 200.00 MiB)"  # activations 1500 → 200 MiB
    assert t2["Gradient checkpointing (ckpt)"][6] == "↓ -14.4% (8.79 GiB → 7.52 GiB)"  # peak 9000 → 7700 MiB
    assert t2["LoRA (lora)"][1] == "− +0.1% (4.59 GiB → 4.60 GiB)"  # parameters 4700 → 4707 MiB
    assert t2["LoRA (lora)"][3] == "↓ -99.9% (4.59 GiB → 7.00 MiB)"  # gradients 4700 → 7 MiB
    assert t2["Gradient accumulation (accum8)"][2] == "− +1.3% (1.46 GiB → 1.48 GiB)"  # under 5 %: no change
    assert t2["Mixed precision (amp)"][4] == "− +0.0% (0 B → 0 B)"
    # Every arrow against the 5 % rule, worked out here from BENCH.
    vanilla = BENCH["vanilla"]
    parts = {"Parameters": 6, "Activations": 9, "Gradients": 7, "Optimizer state": 8, "Peak memory": 5}
    for config, name in (
        ("ckpt", "Gradient checkpointing"),
        ("amp", "Mixed precision"),
        ("lora", "LoRA"),
        ("accum8", "Gradient accumulation"),
    ):
        for part, idx in parts.items():
            a, b = vanilla[idx], BENCH[config][idx]
            want = "−" if a == b or (a and abs(b - a) / a < 0.05) else "↑" if b > a else "↓"
            assert t2[f"{name} ({config})"][t2[""].index(part)].startswith(want), (config, part)
    assert (
        "- **Gradient checkpointing** (ckpt) alone: peak 8.79 GiB → 7.52 GiB (0.86×), time per optimizer step "
        "10.000 → 13.000 s (1.30×)." in text
    )
    assert "Switching on **LoRA** (1 pair of configurations differing only in it): peak × 0.57" in text  # 5100/9000


def test_phase3_tables_are_the_benchmark_readmes_tables(results):
    """One renderer: Tables 3 and 2 and the breakdown are, line for line, those of the benchmark's README.md."""
    text = phase3_text(results)
    readme = (results["bench"] / "README.md").read_text()
    for ours, theirs in (
        ("### Table 3", "## Table 3"),
        ("### Table 2", "## Table 2"),
        ("### Memory by", "## Memory by"),
    ):
        assert table_block(text, ours) == table_block(readme, theirs)
    for png in ("peak_and_time.png", "memory_breakdown.png"):
        assert f"(../finetune_benchmark/{png})" in text  # linked, not redrawn


def test_phase3_changes_when_a_measurement_changes(results):
    rows = [bench_row(n) for n in BENCH if n != "lora"] + [
        bench_row("lora", step_s_mean=4.75, peak_rss_bytes=5300 * MiB)
    ]
    write_bench(results["bench"], rows)
    t3 = table_after(phase3_text(results), "### Table 3", key=lambda c: c[0].split()[-1])
    assert t3["lora"][t3[""].index("Peak RSS")] == "5.18 GiB"  # 5300 / 1024
    assert t3["lora"][t3[""].index("Time / optimizer step (s)")] == "4.750 ± 0.500"


def test_phase3_compares_the_other_stack(results):
    rows = [bench_row(n) for n in BENCH] + [
        bench_row("vanilla", "hf", peak_bytes=9900 * MiB, peak_rss_bytes=9900 * MiB, micro_s_mean=12.5)
    ]
    write_bench(results["bench"], rows)
    t3 = table_after(phase3_text(results), "### Table 3", key=lambda c: c[0].split()[-1])
    hf = t3[""].index("HF Peak RSS")
    assert t3["vanilla"][hf:] == ["9.67 GiB", "0.91", "12.500 ± 0.100", "0.80"]  # 9000/9900 and 10/12.5
    assert t3["ckpt"][hf:] == ["—"] * 4
    assert len([k for k in t3 if k]) == len(BENCH)  # one row per configuration of ours


def test_phase3_shows_the_repeated_rows_beside_hf(results):
    """The benchmark run again over more passes (its own folder beside the first): its own Table 3, ratios from its
    own rows; absent, no section; unreadable, said plainly."""
    heading = "### Table 3's configurations again"
    assert heading not in phase3_text(results)
    repeat = results["bench"].parent / phase3.REPEAT_DIR
    more = dict(passes=4, micro_batches=8, data="the first 2 usable records of alpaca.json")
    hf = dict(micro_s_mean=8.0, peak_bytes=9900 * MiB, peak_rss_bytes=9900 * MiB)
    write_bench(
        repeat, [bench_row("vanilla", **more), bench_row("vanilla", "hf", **more, **hf), bench_row("lora", **more)]
    )
    text = phase3_text(results, warnings := [])
    assert warnings == []
    section = text[text.index(heading) :]
    assert "alpaca.json, 4 passes over them (8 timed micro-batches a configuration)" in section
    t3 = table_after(section, heading, key=lambda c: c[0].split()[-1])
    assert sorted(k for k in t3 if k) == ["lora", "vanilla"]
    ratio = t3[""].index("Time ours/HF")
    assert t3["vanilla"][ratio - 3 : ratio + 1] == ["9.67 GiB", "0.91", "8.000 ± 0.100", "1.25"]  # 10 / 8, 9000 / 9900
    assert t3["lora"][ratio - 3 : ratio + 1] == ["—"] * 4
    (repeat / "measurements.csv").write_text("config\nvanilla\n")
    text = phase3_text(results, warnings := [])
    assert len(warnings) == 1 and "lacks the column" in warnings[0]
    assert "**No results yet** for the repeated rows" in text and phase3.REPEAT_COMMAND in text


# ---- PDFs --------------------------------------------------------------------------------------------------
def pdf_pages(path: Path) -> int:
    """Page objects in the file (counted here, not by the library that wrote it)."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


def test_build_all_writes_markdown_and_pdfs(results):
    out = build_all(results["reports"], results["inference"], results["finetune"], results["bench"], samples="skip")
    assert out["warnings"] == []
    minimum = {"phase_1": 4, "phase_2": 2, "phase_3": 3}
    for name, (md_path, pdf_path) in out["written"].items():
        assert md_path.read_text().startswith("# Phase")
        assert pdf_pages(pdf_path) >= minimum[name], name
    assert b"/Subtype /Image" in (results["reports"] / "phase_2.pdf").read_bytes()  # the benchmark's plot
    phase3_pdf = (results["reports"] / "phase_3.pdf").read_bytes()
    assert len(re.findall(rb"/Subtype\s*/Image", phase3_pdf)) >= 3  # the loss curve and the benchmark's plots
    assert (results["reports"] / "figures" / "phase_3_loss.png").exists()


def test_phase3_sets_the_course_run_beside_the_recipe(results):
    """Both runs' rows come from their own files: held-out losses from eval_log.jsonl, EOS counts from samples."""
    recipe = results["finetune"].parent / "finetune_recipe"
    recipe.mkdir()
    for name in ("summary.json", "train_log.jsonl", "samples.json"):
        (recipe / name).write_bytes((results["finetune"] / name).read_bytes())
    evals = [{"step": 0, "loss": 2.0, "perplexity": 7.389, "label_tokens": 50}]
    evals += [{"step": 8, "loss": 1.5, "perplexity": 4.482, "label_tokens": 50}]
    (recipe / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    barely = [evals[0], {**evals[0], "step": 8, "loss": 1.99995}]  # a change four decimals would show as zero
    (results["finetune"] / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in barely))
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [], recipe)
    rows = table_after(text, "## The course's setting beside a recipe that learns")
    course, learned = rows["held-out loss"][1:]
    assert course.startswith("2.0000 → **1.9999** (-5.0e-05)") and "perplexity 7.39 → 7.39" in course
    assert learned.startswith("2.0000 → **1.5000** (-0.5000)") and "perplexity 7.39 → 4.48" in learned
    assert rows["sample outputs ending with EOS (before → after)"][1] == "1 → 2 of 2"
    assert rows["sample outputs unchanged by training"][1] == "0 of 2"
    assert (results["reports"] / "figures" / "phase_3_heldout.png").stat().st_size > 0
    assert "the held-out loss changed by -5.0e-05 (-0.0025 %)" in text
    (recipe / "summary.json").unlink()
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [], recipe)
    assert "**No results yet** for the recipe run" in text and "make finetune-recipe" in text


def test_phase3_compares_the_recipe_on_each_frozen_base(results):
    """The int8 base's row: its held-out losses against the fp32 base's, the largest per-step training-loss gap
    and its step, from the two runs' logs; a run of another length is said to be not comparable step by step."""
    recipe = results["finetune"].parent / "finetune_recipe"
    evals = [{"step": 0, "loss": 2.0, "perplexity": 7.389, "label_tokens": 50}]
    evals += [{"step": 8, "loss": 1.5, "perplexity": 4.482, "label_tokens": 50}]
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [], recipe)
    assert "**No results yet** for the recipe on a low-precision frozen base" in text
    assert "make finetune-recipe-bases" in text
    steps = read_log(results["finetune"] / "train_log.jsonl")
    for base, shift in (("", 0.0), ("_int8", 0.01)):
        folder = recipe.with_name(recipe.name + base)
        folder.mkdir()
        for name in ("summary.json", "samples.json"):
            (folder / name).write_bytes((results["finetune"] / name).read_bytes())
        shifted = [{**s, "loss": s["loss"] + shift * (1 + (s["step"] == 3))} for s in steps]  # step 3: twice
        (folder / "train_log.jsonl").write_text("".join(json.dumps(s) + "\n" for s in shifted))
        held = [{**e, "loss": e["loss"] + shift * 2} for e in evals]
        (folder / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in held))
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [], recipe)
    rows = table_after(text, "## The recipe on a frozen base in fewer bits", key=lambda cells: cells[0].split()[0])
    assert rows["int8"][2] == "2.0200 (+0.0200, +1.00 %)" and rows["int8"][3] == "1.5200 (+0.0200, +1.33 %)"
    assert rows["int8"][5] == "0.0200 (step 3)" and rows["fp32"][5] == "—"
    assert (results["reports"] / "figures" / "phase_3_bases.png").stat().st_size > 0
    (recipe.with_name(recipe.name + "_int8") / "train_log.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in steps[:-1])
    )
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [], recipe)
    assert f"int8: {len(steps) - 1} steps against the fp32 base's {len(steps)}" in text
