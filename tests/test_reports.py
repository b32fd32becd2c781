"""The report builder: numbers come from the code and from the results files, and every PDF is produced."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama.checkpoint import REPO_ROOT
from project.reports import phase1, phase2, phase3
from project.reports.build import build_all
from project.reports.inputs import FINETUNE, FINETUNE_BENCH, INFERENCE

ENV = {"commit": "abc1234", "torch": "2.x", "python": "3.x", "fpdf2": "2.x", "machine": "test"}


# ---- fixtures: small results files in the formats the inputs mapping describes ----------------------------
def write_csv(path: Path, mapping: dict, rows: list[dict]):
    """Rows keyed by the report's names, written under the names the mapping says the files use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[mapping.get(k, k) for k in keys])
        w.writeheader()
        for r in rows:
            w.writerow({mapping.get(k, k): v for k, v in r.items()})


INFERENCE_ROWS = {  # (batch, kv) -> repeats of (wall_s, tokens_per_s, peak_mib)
    (1, "on"): [(1.25, 25.6, 812.0), (1.31, 24.4, 815.0), (1.22, 26.2, 813.0)],
    (1, "off"): [(3.10, 10.3, 790.0), (3.30, 9.7, 792.0), (3.20, 10.0, 791.0)],
    (8, "on"): [(2.10, 121.9, 901.0), (2.20, 116.4, 905.0), (2.00, 128.0, 903.0)],
    (8, "off"): [(9.50, 26.9, 1404.0), (9.70, 26.4, 1410.0), (9.60, 26.7, 1407.0)],
}


def inference_rows(oom_batch16_off: bool = True) -> list[dict]:
    rows = []
    for (b, kv), reps in INFERENCE_ROWS.items():
        for wall, tps, peak in reps:
            rows.append(dict(batch_size=b, input_len=256, output_len=32, kv=kv, status="ok", wall_s=wall,
                             prefill_s=wall / 4, decode_s=wall * 3 / 4, tokens_per_s=tps, peak_mib=peak,
                             peak_above_weights_mib=peak - 700, kv_cache_bytes=6635520 * b if kv == "on" else 0,
                             device="cpu", dtype="bf16", torch="2.x", commit="feed123"))  # fmt: skip
    rows.append(dict(batch_size=16, input_len=256, output_len=32, kv="off", status="OOM", device="cpu", dtype="bf16",
                     torch="2.x", commit="feed123"))  # fmt: skip
    rows.append(dict(batch_size=16, input_len=256, output_len=32, kv="on", status="ok", wall_s=3.5, prefill_s=1.0,
                     decode_s=2.5, tokens_per_s=146.3, peak_mib=1001.0, peak_above_weights_mib=301.0,
                     kv_cache_bytes=6635520 * 16, device="cpu", dtype="bf16", torch="2.x", commit="feed123"))  # fmt: skip
    return rows


SAMPLES = {
    "model": "tiny", "device": "cpu", "dtype": "bf16", "torch": "2.x", "commit": "feed123", "max_gen_len": 8,
    "decoding": "greedy", "command": "python -m project.reports --samples=run",
    "samples": [{"prompt": "Say hi.", "with_cache": "Hi there!", "without_cache": "Hi there!", "same_tokens": True,
                 "with_cache_s": 0.5, "without_cache_s": 0.9}],
}  # fmt: skip

BENCH = {  # (ckpt, amp, lora, accum) -> (step_s, peak_bytes, param, grad, optim, activation)
    (0, 0, 0, 1): (10.0, 9000 * 2**20, 4700 * 2**20, 4700 * 2**20, 0, 1500 * 2**20),
    (1, 0, 0, 1): (13.0, 7700 * 2**20, 4700 * 2**20, 4700 * 2**20, 0, 200 * 2**20),
    (0, 1, 0, 1): (6.0, 8400 * 2**20, 4700 * 2**20, 4700 * 2**20, 0, 800 * 2**20),
    (0, 0, 1, 1): (4.0, 5100 * 2**20, 4707 * 2**20, 7 * 2**20, 0, 1450 * 2**20),
    (0, 0, 0, 8): (80.0, 9050 * 2**20, 4700 * 2**20, 4700 * 2**20, 0, 1520 * 2**20),
}


def bench_rows() -> list[dict]:
    rows = []
    for (c, a, l, acc), (step, peak, par, grad, opt, act) in BENCH.items():
        rows.append(dict(grad_ckpt=bool(c), mixed_precision=bool(a), lora=bool(l), grad_accum=acc, status="ok",
                         step_s=step, micro_s=step / acc, peak_bytes=peak, param_bytes=par, grad_bytes=grad,
                         optim_bytes=opt, activation_bytes=act, device="cpu", dtype="fp32", torch="2.x",
                         commit="feed123"))  # fmt: skip
    rows.append(dict(grad_ckpt=True, mixed_precision=True, lora=True, grad_accum=1, status="OOM", device="cpu",
                     dtype="fp32", torch="2.x", commit="feed123"))  # fmt: skip
    return rows


LOSSES = [2.5, 2.31, 2.2, 2.05, 1.98, 1.9, 1.86, 1.8]


def write_finetune(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    log = FINETUNE["loss_columns"]
    lines = [json.dumps({log["step"]: i + 1, log["loss"]: x, log["step_s"]: 1.5, log["tokens_per_s"]: 400.0})
             for i, x in enumerate(LOSSES)]  # fmt: skip
    (folder / FINETUNE["loss_log"][0]).write_text("\n".join(lines) + "\n")
    keys = FINETUNE["sample_keys"]
    samples = [{keys["prompt"]: "Name a colour.", keys["before"]: "colour colour", keys["after"]: "Blue."}]
    (folder / FINETUNE["samples"][0]).write_text(json.dumps(samples))
    s = FINETUNE["summary_keys"]
    (folder / "summary.md").write_text(
        f"# Fine-tuning run\n\n- **{s['model']}**: tiny\n- **{s['trainable']}**: trainable parameters: 4,608 of "
        f"1,000,000 (0.461%)\n- **{s['grad_ckpt']}**: none (0 of 2 blocks)\n- **{s['command']}**: `python finetuning.py`\n"
    )


@pytest.fixture
def results(tmp_path):
    inf, ft, bench = tmp_path / "inference", tmp_path / "finetune", tmp_path / "finetune_benchmark"
    write_csv(inf / INFERENCE["files"][0], INFERENCE["columns"], inference_rows())
    (inf / INFERENCE["samples"]).write_text(json.dumps(SAMPLES))
    write_finetune(ft)
    write_csv(bench / FINETUNE_BENCH["files"][0], FINETUNE_BENCH["columns"], bench_rows())
    return {"reports": tmp_path / "reports", "inference": inf, "finetune": ft, "bench": bench}


def table_after(text: str, heading: str) -> dict[str, list[str]]:
    """The first pipe table after heading, as {first cell: other cells}, plus the header under key ''."""
    rest = text[text.index(heading):]
    lines = [l for l in rest.splitlines() if l.startswith("|")]
    start = rest.splitlines().index(lines[0])
    block = []
    for l in rest.splitlines()[start:]:
        if not l.startswith("|"):
            break
        block.append([c.strip() for c in l.strip().strip("|").split("|")])
    return {("" if i == 0 else r[0]): (r[1:] if i else r) for i, r in enumerate(block) if not set(r[0]) <= set("-")}


# ---- Phase 1 -----------------------------------------------------------------------------------------------
def test_phase1_numbers_come_from_the_code_and_match_hand_counts():
    text = phase1.build(ENV, warnings := [])
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
def expected_table1(rows=INFERENCE_ROWS):
    exp = {}
    for kv, label in (("on", "With KV cache"), ("off", "Without KV cache")):
        for b in (1, 8):
            walls, tps, peaks = zip(*rows[(b, kv)])
            exp[(f"{label}: runtime (s)", b)] = f"{statistics.median(walls):,.2f}"
            exp[(f"{label}: tokens/s", b)] = f"{statistics.median(tps):,.1f}"
            exp[(f"{label}: peak memory (MiB)", b)] = f"{statistics.median(peaks):,.0f}"
    return exp


def test_phase2_table1_cells_come_from_the_csv(results):
    text = phase2.build(results["reports"], results["inference"], "skip", ENV, [])
    t = table_after(text, "### Table 1:")
    assert t[""] == ["Batch size", "1", "8", "16"]
    for (row, b), value in expected_table1().items():
        assert t[row][[1, 8].index(b)] == value, (row, b)
    assert t["Without KV cache: runtime (s)"][2] == "×"  # the simulated OOM
    assert t["With KV cache: runtime (s)"][2] == "3.50"
    assert t["With KV cache: cache size (MiB)"][0] == f"{6635520 / 2**20:,.1f}"
    slow = statistics.median([9.5, 9.7, 9.6]) / statistics.median([2.1, 2.2, 2.0])
    assert f"({slow:.1f}× slower)" in text
    assert "Hi there!" in text and "identical tokens" in text
    assert "device cpu, dtype bf16" in text and "python benchmark_inference.py" in text


def test_phase2_changes_when_a_measurement_changes(results):
    rows = dict(INFERENCE_ROWS)
    rows[(8, "off")] = [(19.5, 13.0, 1404.0), (19.7, 13.1, 1410.0), (19.6, 13.3, 1407.0)]
    write_csv(results["inference"] / INFERENCE["files"][0], INFERENCE["columns"],
              [r for r in inference_rows() if not (r["batch_size"] == 8 and r["kv"] == "off")]
              + [dict(batch_size=8, input_len=256, output_len=32, kv="off", status="ok", wall_s=w, tokens_per_s=t,
                      peak_mib=p, device="cpu", dtype="bf16", torch="2.x", commit="feed123") for w, t, p in rows[(8, "off")]])  # fmt: skip
    t = table_after(phase2.build(results["reports"], results["inference"], "skip", ENV, []), "### Table 1:")
    assert t["Without KV cache: runtime (s)"][1] == "19.60"
    assert t["Without KV cache: tokens/s"][1] == "13.1"


def test_missing_results_are_said_plainly(tmp_path):
    text2 = phase2.build(tmp_path, tmp_path / "none", "skip", ENV, [])
    assert "No results yet" in text2 and "python benchmark_inference.py" in text2
    text3 = phase3.build(tmp_path, tmp_path / "none", tmp_path / "none2", ENV, [])
    assert FINETUNE_BENCH["command"] in text3 and text3.count("No results yet") >= 4


# ---- Phase 3 -----------------------------------------------------------------------------------------------
def test_phase3_tables_come_from_the_results(results):
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [])
    t3 = table_after(text, "### Table 3")
    for (c, a, l, acc), (step, peak, *_) in BENCH.items():
        name = " + ".join(n for n, on in (("ckpt", c), ("AMP", a), ("LoRA", l), ("accum", acc > 1)) if on) or "vanilla"
        assert t3[name][4] == f"{peak / 2**20:,.0f}" and t3[name][5] == f"{step:,.2f}", name
    assert t3["ckpt + AMP + LoRA"][4] == "×"
    t2 = table_after(text, "### Table 2")
    threshold = FINETUNE_BENCH["threshold"]
    vanilla = BENCH[(0, 0, 0, 1)]
    for name, key in (("Gradient checkpointing", (1, 0, 0, 1)), ("Mixed precision", (0, 1, 0, 1)),
                      ("LoRA", (0, 0, 1, 1)), ("Gradient accumulation", (0, 0, 0, 8))):  # fmt: skip
        for col, idx in (("Parameters", 2), ("Activations", 5), ("Gradients", 3), ("Optimizer state", 4)):
            a, b = vanilla[idx] / 2**20, BENCH[key][idx] / 2**20
            ch = 0 if a == 0 and b == 0 else math.inf if a == 0 else (b - a) / a
            want = "−" if abs(ch) < threshold else "↑" if ch > 0 else "↓"
            cell = t2[name][list(t2[""]).index(f"{col} (MiB)") - 1]
            assert cell.startswith(f"{want} {a:,.1f} → {b:,.1f}"), (name, col, cell)
    assert "↓ 1,500.0 → 200.0" in text  # checkpointing cuts the activations
    assert "4,608 trainable parameters of 1,000,000, **0.461 %**" in text
    t_loss = table_after(text, "## Training loss")
    assert [t_loss[str(i + 1)][0] for i in range(len(LOSSES))] == [f"{x:,.4f}" for x in LOSSES]
    assert "Blue." in text and "colour colour" in text
    assert "1,703,936" in text and "— the same." in text


def test_phase3_changes_when_a_measurement_changes(results):
    BENCH_CHANGED = dict(BENCH)
    BENCH_CHANGED[(0, 0, 1, 1)] = (4.75, 5300 * 2**20, 4707 * 2**20, 7 * 2**20, 0, 1450 * 2**20)
    rows = [r for r in bench_rows() if not (r["lora"] and not r["grad_ckpt"] and not r["mixed_precision"])]
    step, peak, par, grad, opt, act = BENCH_CHANGED[(0, 0, 1, 1)]
    rows.append(dict(grad_ckpt=False, mixed_precision=False, lora=True, grad_accum=1, status="ok", step_s=step,
                     micro_s=step, peak_bytes=peak, param_bytes=par, grad_bytes=grad, optim_bytes=opt,
                     activation_bytes=act))  # fmt: skip
    write_csv(results["bench"] / FINETUNE_BENCH["files"][0], FINETUNE_BENCH["columns"], rows)
    t3 = table_after(phase3.build(results["reports"], results["finetune"], results["bench"], ENV, []), "### Table 3")
    assert t3["LoRA"][4] == "5,300" and t3["LoRA"][5] == "4.75"


def test_phase3_compares_the_other_stack(results):
    rows = [dict(r, runner="ours") for r in bench_rows()]
    rows.append(dict(rows[0], runner="hf", step_s=12.5, peak_bytes=9900 * 2**20))
    write_csv(results["bench"] / FINETUNE_BENCH["files"][0], FINETUNE_BENCH["columns"], rows)
    text = phase3.build(results["reports"], results["finetune"], results["bench"], ENV, [])
    t = table_after(text, "### Against Hugging Face")
    assert t["vanilla"] == ["hf", "10.00", "12.50", "1.25×", "9,000", "9,900", "1.10×"]
    assert table_after(text, "### Table 3")["vanilla"][5] == "10.00"  # Table 3 shows our stack only


# ---- PDFs --------------------------------------------------------------------------------------------------
def pdf_pages(path: Path) -> int:
    """Page objects in the file (counted here, not by the library that wrote it)."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


def test_build_all_writes_markdown_and_pdfs(results):
    out = build_all(results["reports"], results["inference"], results["finetune"], results["bench"], samples="skip")
    minimum = {"phase_1": 4, "phase_2": 2, "phase_3": 3}
    for name, (md_path, pdf_path) in out["written"].items():
        assert md_path.read_text().startswith("# Phase")
        assert pdf_pages(pdf_path) >= minimum[name], name
    assert b"/Subtype /Image" in (results["reports"] / "phase_3.pdf").read_bytes()  # the loss curve
    assert (results["reports"] / "figures" / "phase_3_loss.png").exists()
