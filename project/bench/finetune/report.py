"""Table 3 (every configuration), Table 2 (what each technique does to each part of memory), the memory breakdown
and the plots, computed from measurements.csv (and the timeline JSON files); nothing here measures anything.

The one renderer of these tables: write_report (the benchmark's README.md) and the phase 3 report
(project/reports/phase3.py) both call read_measurements and the *_section functions, and link the PNGs in PLOTS.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from llama.checkpoint import SHAPES, atomic_write

from .configs import VANILLA

THRESHOLD = 0.05  # |change| below 5% of the vanilla value counts as "no significant change" (−)
PARTS = [  # (CSV column, Table 2 / plot label)
    ("param_bytes", "Parameters"),
    ("activation_bytes", "Activations"),
    ("grad_bytes", "Gradients"),
    ("optim_bytes", "Optimizer state"),
    ("logits_loss_bytes", "Logits / loss buffers"),
]
TECHNIQUES = [  # (Table 2 row, the configuration that turns on only this technique)
    ("Gradient accumulation", "accum"),
    ("Gradient checkpointing", "ckpt"),
    ("Mixed precision", "amp"),
    ("LoRA", "lora"),
]
# What a held-in-lower-precision frozen base changes, against the same configuration with an fp32 base:
# (Table 2 row, the configuration, the one it is compared with).
BASE_CHANGES = [
    ("Mixed precision with LoRA: autocast + frozen base held in the autocast dtype", "amp+lora", "lora"),
    ("bf16-stored frozen base, fp32 arithmetic", "lora+bf16", "lora"),
    ("int8 frozen base", "lora+int8", "lora"),
    ("int4 frozen base", "lora+int4", "lora"),
]
MARK = {True: "✓", False: "×"}
PLOTS = {  # file -> caption; timeline.png only when timelines were recorded
    "peak_and_time.png": "peak memory and time",
    "memory_breakdown.png": "memory breakdown",
    "timeline.png": "memory timeline",
}


# ---- formatting ----------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(mean: float, std: float, n: int) -> str:
    if n is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f} (1 sample)"


def arrow(base: float, value: float, threshold: float = THRESHOLD) -> tuple[str, float]:
    """(↑ / ↓ / −, relative change) of value against base; − when |change| < threshold."""
    if base == 0:
        return ("−", 0.0) if value == 0 else ("↑", math.inf)
    change = (value - base) / base
    if abs(change) < threshold:
        return "−", change
    return ("↑" if change > 0 else "↓"), change


def arrow_cell(base: float, value: float) -> str:
    sign, change = arrow(base, value)
    pct = "" if math.isinf(change) else f" {100 * change:+.1f}%"
    return f"{sign}{pct} ({fmt_bytes(base)} → {fmt_bytes(value)})"


# ---- tables --------------------------------------------------------------------------------------------
def techniques_on(row) -> frozenset[str]:
    """The TECHNIQUES keys a measurements row switches on (accumulation: grad_accum above 1)."""
    flags = {"accum": row.grad_accum > 1, "ckpt": row.grad_ckpt, "amp": row.amp, "lora": row.lora}
    return frozenset(k for k, on in flags.items() if on)


def technique_config(frame: pd.DataFrame, key: str) -> pd.Series | None:
    """Our stack's first configuration with only technique `key` on, or None."""
    ours = frame[frame["stack"] == "ours"]
    match = [r for _, r in ours.iterrows() if techniques_on(r) == {key} and r.get("base") not in ("int8", "int4")]
    return match[0] if match else None


def table2(frame: pd.DataFrame) -> list[str]:
    """One row per technique: each measured part against vanilla, with the arrow and the numbers."""
    ours = frame[frame["stack"] == "ours"]
    vanilla = ours[ours.config == VANILLA.name]
    header = "| Technique | " + " | ".join(label for _, label in PARTS) + " | Peak memory |"
    lines = [header, "|---" * (len(PARTS) + 2) + "|"]
    if not len(vanilla) or vanilla.iloc[0].status != "ok":
        return lines + ["", "(no successful vanilla run to compare with)"]
    base = vanilla.iloc[0]
    for label, key in TECHNIQUES:
        row = technique_config(frame, key)
        if row is None:
            continue
        lines.append(_table2_row(f"{label} ({row.config})", base, row))
    by_name = {r.config: r for _, r in ours.iterrows()}
    for label, name, against in BASE_CHANGES:
        if name in by_name and against in by_name and by_name[against].status == "ok":
            lines.append(_table2_row(f"{label} ({name} against {against})", by_name[against], by_name[name]))
    return lines


def _table2_row(label: str, base: pd.Series, row: pd.Series) -> str:
    if row.status != "ok":
        return f"| {label} | " + " | ".join([row.status] * (len(PARTS) + 1)) + " |"
    cells = [arrow_cell(base[col], row[col]) for col, _ in PARTS] + [arrow_cell(base.peak_bytes, row.peak_bytes)]
    return f"| {label} | " + " | ".join(cells) + " |"


def _time_cell(row, prefix: str) -> str:
    if row.status != "ok":
        return f"{row.status} (×)"
    return fmt_time(row[f"{prefix}_mean"], row[f"{prefix}_std"], row.get("micro_batches"))


def _peak_cell(row) -> str:
    if row.status != "ok":
        return f"{row.status} (×)"
    if str(row.device).startswith("cuda"):
        return f"{fmt_bytes(row.peak_allocated_bytes)} / {fmt_bytes(row.peak_reserved_bytes)}"
    return fmt_bytes(row.peak_rss_bytes)


def held_in(row) -> str:
    """What the configuration holds its weights in: fp32 master weights, or LoRA's frozen base dtype."""
    base = row.get("base", "fp32")
    base = "fp32" if not isinstance(base, str) else base
    if not row.lora:
        return "fp32 (master)"
    stored = " (stored; fp32 arithmetic)" if base in ("bf16", "fp16") and not row.amp else ""
    return f"base {base}{stored}, adapters fp32"


def table3(frame: pd.DataFrame) -> list[str]:
    """One row per configuration: the techniques on (✓) or off (×), peak memory and time; hf beside ours."""
    cuda = frame.device.astype(str).str.startswith("cuda").any()
    peak_name = "Peak allocated / reserved" if cuda else "Peak RSS"
    hf = frame[frame["stack"] == "hf"]
    cols = ["Gradient checkpointing", "Mixed precision", "LoRA", "Gradient accumulation", "Weights held in", peak_name]
    cols += [] if cuda else ["Above idle"]
    cols += ["Time / optimizer step (s)", "Time / micro-batch (s)", "Tokens/s"]
    if len(hf):
        cols += [f"HF {peak_name}", "Peak ours/HF", "HF time / micro-batch (s)", "Time ours/HF"]
    steal = not cuda and "cpu_steal" in frame and frame.cpu_steal.notna().any()
    if steal:
        cols += ["CPU steal" + (" ours / HF" if len(hf) else "")]
    lines = ["| # | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, row in enumerate(frame[frame["stack"] == "ours"].itertuples(index=False), 1):
        r = pd.Series(row._asdict())
        ok = r.status == "ok"
        cells = [
            MARK[bool(r.grad_ckpt)],
            f"{MARK[bool(r.amp)]} {r.precision if r.amp else ''}".strip(),
            MARK[bool(r.lora)],
            f"{MARK[r.grad_accum > 1]} {r.grad_accum}",
            held_in(r),
            _peak_cell(r),
        ]
        cells += [] if cuda else [fmt_bytes(r.peak_above_idle_bytes) if ok else "×"]
        cells += [_time_cell(r, "step_s"), _time_cell(r, "micro_s"), f"{r.tokens_per_s:.1f}" if ok else "×"]
        if len(hf):
            twin = hf[hf.config == r.config]
            if len(twin):
                h = twin.iloc[0]
                both = ok and h.status == "ok"
                cells += [
                    _peak_cell(h),
                    f"{r.peak_bytes / h.peak_bytes:.2f}" if both else "×",
                    _time_cell(h, "micro_s"),
                    f"{r.micro_s_mean / h.micro_s_mean:.2f}" if both else "×",
                ]
            else:
                cells += ["—"] * 4
        if steal:
            twin = hf[hf.config == r.config] if len(hf) else hf
            shares = [r.get("cpu_steal")] + ([twin.iloc[0].get("cpu_steal")] if len(twin) else [])
            cells.append(" / ".join("—" if pd.isna(v) else f"{100 * v:.0f}%" for v in shares))
        lines.append(f"| {i} {r.config} | " + " | ".join(cells) + " |")
    return lines


def breakdown_table(frame: pd.DataFrame) -> list[str]:
    cols = [label for _, label in PARTS] + ["Sum of parts", "Peak", "Peak − sum"]
    lines = ["| Configuration | Stack | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for row in frame.itertuples(index=False):
        r = pd.Series(row._asdict())
        if r.status != "ok":
            lines.append(f"| {r.config} | {r['stack']} | " + " | ".join([r.status] * len(cols)) + " |")
            continue
        total = sum(r[c] for c, _ in PARTS)
        cells = [fmt_bytes(r[c]) for c, _ in PARTS] + [
            fmt_bytes(total),
            fmt_bytes(r.peak_bytes),
            fmt_bytes(r.peak_bytes - total),
        ]
        lines.append(f"| {r.config} | {r['stack']} | " + " | ".join(cells) + " |")
    return lines


# ---- plots -----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    _plt().close(fig)


def plot_peak_and_time(frame: pd.DataFrame, path: Path, title: str):
    """Peak memory, time per micro-batch and per optimizer step for each configuration (hf beside ours)."""
    plt = _plt()
    names = list(dict.fromkeys(frame.config))
    stacks = list(dict.fromkeys(frame["stack"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) * len(stacks) + 1.8), sharey=True)
    height = 0.8 / len(stacks)
    for j, stack in enumerate(stacks):
        rows = frame[frame["stack"] == stack].set_index("config").reindex(names)
        y = [i + j * height for i in range(len(names))]
        ok = rows.status == "ok"
        for ax, col, std, label in (
            (axes[0], "peak_bytes", None, "peak memory (GiB)"),
            (axes[1], "micro_s_mean", "micro_s_std", "time per micro-batch (s)"),
            (axes[2], "step_s_mean", "step_s_std", "time per optimizer step (s)"),
        ):
            values = rows[col].where(ok, 0).astype(float) / (2**30 if col == "peak_bytes" else 1)
            errors = rows[std].where(ok, 0).astype(float).fillna(0) if std else None
            ax.barh(y, values, height=height, xerr=errors, label=stack, capsize=2)
            for yi, is_ok, status in zip(y, ok, rows.status):
                if not is_ok:
                    ax.text(0, yi, f" {status} ×", va="center", fontsize=8, color="crimson")
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([i + height * (len(stacks) - 1) / 2 for i in range(len(names))], names)
    axes[0].invert_yaxis()
    if len(stacks) > 1:
        axes[0].legend()
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_breakdown(frame: pd.DataFrame, path: Path, title: str):
    """Stacked measured parts per configuration, the rest of the peak as 'other', the peak as a mark."""
    plt = _plt()
    rows = frame[(frame["stack"] == "ours") & (frame.status == "ok")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for col, label in PARTS:
        values = (rows[col] / 2**30).tolist()
        ax.barh(range(len(rows)), values, left=left, label=label)
        left = [a + b for a, b in zip(left, values)]
    other = [max(0.0, p / 2**30 - s) for p, s in zip(rows.peak_bytes, left)]
    ax.barh(range(len(rows)), other, left=left, label="other (runtime, allocator, temporaries)", color="lightgrey")
    ax.scatter(
        rows.peak_bytes / 2**30, range(len(rows)), marker="|", s=300, color="black", label="measured peak", zorder=3
    )
    ax.set_yticks(range(len(rows)), rows.config)
    ax.invert_yaxis()
    ax.set_xlabel("GiB")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_timelines(timelines: dict[str, dict], path: Path, title: str):
    """Live bytes by category through one optimizer step, one panel per configuration, phases marked."""
    plt = _plt()
    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 3.2 * len(timelines)), squeeze=False)
    for ax, (name, tl) in zip(axes[:, 0], timelines.items()):
        keep = [i for i, c in enumerate(tl["categories"]) if any(s[i] for s in tl["bytes"])]
        series = [[s[i] / 2**30 for s in tl["bytes"]] for i in keep]
        ax.stackplot([t / 1000 for t in tl["t_ms"]], *series, labels=[tl["categories"][i] for i in keep], step="post")
        seen = set()
        for t, phase in tl.get("marks", []):
            if (phase, round(t)) not in seen:  # one line per phase start (one per micro-batch)
                seen.add((phase, round(t)))
                ax.axvline(t / 1000, color="black", lw=0.6, ls="--")
                ax.text(t / 1000, ax.get_ylim()[1] * 0.97, f" {phase}", fontsize=7, va="top")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("GiB live")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel("seconds into the step")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


# ---- the report -------------------------------------------------------------------------------------------
def _unique(frame: pd.DataFrame, col: str) -> str:
    if col not in frame:
        return "n/a"
    values = [str(v) for v in dict.fromkeys(frame[col].dropna())]
    return "; ".join(values) if values else "n/a"


def _native_note(frame: pd.DataFrame) -> list[str]:
    """Say so when the device has no native low-precision matmul for the autocast dtype used."""
    dtypes = set(frame[frame.amp].precision)
    slow = sorted(d for d in dtypes if f"{d}_native" in frame and frame[f"{d}_native"].eq(False).any())
    if not slow:
        return []
    return [
        f"This device has no native {'/'.join(slow)} matrix multiply (oneDNN needs AVX512-BF16 or AMX): "
        "autocast then runs its matmuls in slow, single-threaded fallback kernels, so here the mixed-precision "
        "configurations are slow (or skipped, or time out) for want of hardware support, not because of the "
        "technique: measure them on a GPU or a CPU with AVX512-BF16/AMX."
    ]


def read_measurements(csv_path: Path) -> pd.DataFrame:
    """measurements.csv with the technique switches as booleans."""
    frame = pd.read_csv(csv_path)
    for col in ("grad_ckpt", "amp", "lora"):
        frame[col] = frame[col].astype(bool)
    return frame


def _cpu(frame: pd.DataFrame) -> bool:
    return not frame.device.astype(str).str.startswith("cuda").any()


def table3_section(frame: pd.DataFrame) -> list[str]:
    """Table 3 and what its columns and status marks mean."""
    return [
        *table3(frame),
        "",
        (
            "Peak RSS is the process's peak resident memory over the measured steps (the kernel's mark reset "
            "before them); *above idle* subtracts the resident memory after loading the model and building the "
            "optimizer, before the first step."
            if _cpu(frame)
            else "Peak allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved over the "
            "measured steps."
        ),
        "Each configuration ran in its own fresh process. `OOM (×)`: the configuration ran out of memory; "
        "`timeout (×)`: it did not finish within the command's `--timeout_s` (loading included); "
        "`skipped (×)`: mixed precision on a CPU that only emulates its matmuls (`--emulated_amp` runs it), or "
        "a configuration the other stack has no counterpart for (the message in the CSV says which).",
        *(
            [
                "*CPU steal*: the share of CPU time the hypervisor gave other guests while the configuration ran "
                "(from /proc/stat); timings taken under steal are slower than this machine's own speed, and a ratio "
                "of two runs under different steal is off by as much."
            ]
            if "cpu_steal" in frame and frame.cpu_steal.notna().any() and _cpu(frame)
            else []
        ),
        *_native_note(frame),
    ]


def table2_section(frame: pd.DataFrame) -> list[str]:
    """Table 2 and how to read its arrows."""
    return [
        *table2(frame),
        "",
        f"Each technique alone against vanilla (same examples). ↑ / ↓: the part grows / shrinks by at least "
        f"{THRESHOLD:.0%} of its vanilla value; −: |change| < {THRESHOLD:.0%} (no significant change). "
        "Parameters, gradients and optimizer state are the bytes of those tensors; activations are the bytes "
        "autograd saves for backward inside the model's forward (de-duplicated by storage, parameters excluded); "
        "logits / loss buffers are the logits tensor plus what the loss saves (ours computes the logits of the "
        "label positions only, a chunk at a time, and keeps none: project/loss.py). Each is its largest value over "
        "the measured micro-batches. Gradient accumulation runs micro-batches of the same size, so it changes "
        "none of the parts: what it buys is a larger effective batch for about the memory of a batch of 1. Its "
        "peak can still be higher: from the second micro-batch on, the gradients summed so far are held through "
        "the whole forward and backward pass, and each new gradient is computed beside the one it is added to "
        "(the largest, the embedding's, is vocabulary × dimension), where a single micro-batch's gradients "
        "appear one by one, each kept as computed, while its activations are freed. "
        "The last rows compare a LoRA run whose frozen base is held in fewer bits with the same run on an fp32 "
        "base: there the parameters shrink.",
    ]


def breakdown_section(frame: pd.DataFrame) -> list[str]:
    """Memory by what holds it, and why the parts need not add up to the peak."""
    return [
        *breakdown_table(frame),
        "",
        "The parts are each at their largest, and are not all live at the same moment (backward frees "
        "activations while it allocates gradients), so *peak − sum* is the rest of the process "
        + ("(Python, libraries, allocator caches, temporaries)" if _cpu(frame) else "(temporaries, workspace)")
        + "; a negative value means the parts never coexist in full.",
    ]


def _per_rank(r: pd.Series, key: str) -> list:
    """Every rank's value of key (a JSON list in {key}_ranks), or the one process's."""
    return json.loads(r[f"{key}_ranks"]) if r.ranks > 1 else [r[key]]


def ranks_section(frame: pd.DataFrame) -> list[str]:
    """The configurations run under torchrun (stacks ddp / fsdp) beside one process: what each rank holds and how
    long its steps take."""
    rows = frame[frame["stack"] != "hf"]
    cols = ["Parameters / rank", "Gradients / rank", "Optimizer state / rank", "Activations / rank", "Peak per rank"]
    cols += ["Micro-batches / rank / step", "Time / step (s)", "Time / micro-batch (s)", "Threads / rank"]
    lines = ["| Configuration | Stack | Ranks | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for config in dict.fromkeys(rows.config):
        for row in rows[rows.config == config].itertuples(index=False):
            r = pd.Series(row._asdict())
            head = f"| {r.config} | {r['stack']} | {r.ranks} | "
            if r.status != "ok":
                lines.append(head + " | ".join([f"{r.status} (×)"] + [""] * (len(cols) - 1)) + " |")
                continue
            held = ("param_bytes", "grad_bytes", "optim_bytes", "activation_bytes", "peak_bytes")
            cells = [" / ".join(fmt_bytes(v) for v in _per_rank(r, key)) for key in held]
            cells += [
                str(r.grad_accum),
                f"{r.step_s_mean:.3f}",
                " / ".join(f"{v:.3f}" for v in _per_rank(r, "micro_s_mean")),
                str(int(r.threads)),
            ]
            lines.append(head + " | ".join(cells) + " |")
    return lines + [
        "",
        "Values separated by / are rank 0, rank 1, ... Under torchrun `--grad_accum` is per rank (as in "
        "finetuning.py): an optimizer step takes ranks × grad_accum micro-batches, each rank its own slice, and "
        "gradients are synchronised once, at the window's last micro-batch. DDP keeps a whole replica on each "
        "rank; FSDP2 shards parameters, gradients and optimizer state, so each rank holds about 1 / ranks of them "
        "(activations are each rank's own and do not shrink). The time per step is the slowest rank's. "
        + (
            "On a CPU the ranks share the machine's cores (the threads are split between them), so these rows "
            "show correctness and memory, not a speed-up: parallel ranks pay for it in threads per rank and in "
            "all-reduces (DDP) or all-gathers of every block's weights (FSDP) over gloo. Nor does a rank's peak "
            "resident memory show FSDP's sharding on a CPU: every rank loads the whole checkpoint before sharding "
            "it, and the allocator keeps what was freed (project/allocator.py); the tensor bytes in the first "
            "columns are what shrink, as a GPU's allocated memory would."
            if _cpu(frame)
            else ""
        ),
    ]


def shape_of(frame: pd.DataFrame) -> str | None:
    """The random-weight shape the rows measured (e.g. llama3.2-1b), or None for a checkpoint."""
    models = {str(m) for m in frame["model"].dropna()}
    names = {m.split(" ")[0] for m in models if "random weights" in m}
    return names.pop() if len(names) == 1 and len(models) == 1 and next(iter(names)) in SHAPES else None


def floor_section(frame: pd.DataFrame, machine: dict) -> list[str]:
    """Each of our measured configurations against the machine's matmul rate (machine_limits.json)."""
    rates = machine.get("matmul_TFLOP_per_s", {})
    shape = shape_of(frame)
    if shape is None or not rates:
        return ["(a compute floor needs a random-weight shape, whose matmul sizes are known, and the matmul rates)"]
    a = SHAPES[shape]
    kv = a.n_kv_heads * a.head_dim
    weights = a.n_layers * (2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.hidden_dim)  # the blocks' matmuls
    lines = [
        "| Configuration | Matmul dtype | TFLOP per micro-batch | Machine rate (TFLOP/s) | Floor (s) | "
        "Measured (s) | Share of the rate |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in frame[(frame["stack"] == "ours") & (frame.status == "ok")].itertuples():
        dtype = r.precision if r.amp else "fp32"
        if dtype not in rates:
            continue
        passes = 2 + 2 + (0 if r.lora else 2) + (2 if r.grad_ckpt else 0)
        flops = passes * weights * r.tokens / r.micro_batches
        floor = flops / (rates[dtype] * 1e12)
        lines.append(
            f"| {r.config} | {dtype} | {flops / 1e12:.3f} | {rates[dtype]} | {floor:.2f} | {r.micro_s_mean:.2f} | "
            f"{100 * floor / r.micro_s_mean:.0f}% |"
        )
    lines += [
        "",
        f"FLOPs per token: 2 per weight of the blocks' linear layers ({weights / 1e9:.3f} G on {shape}) for the "
        "forward, 2 for the input gradients, 2 more for the weight gradients of full fine-tuning (LoRA's own are "
        "negligible), 2 more to recompute the forward under checkpointing. The output layer, attention scores and "
        "elementwise work are not counted, so the floor is a lower bound and the share of the machine's matmul "
        "rate (from `../shared/tools/machine_limits.py`, in `machine_limits.json`) is an underestimate.",
    ]
    if _unique(frame[frame["stack"] == "ours"], "cpu_fp32_matmul") == "onednn":
        lines += [
            "",
            "The tool times `F.linear`, i.e. PyTorch's default kernel for each dtype; this run's fp32 products went "
            "through oneDNN instead (llama/matmul.py), which on this CPU is faster than the default BLAS at these "
            "shapes, so an fp32 share can exceed what the tool's rate suggests is possible.",
        ]
    return lines


def write_report(csv_path: Path, out_dir: Path) -> Path:
    """README.md, peak_and_time.png, memory_breakdown.png and timeline.png in out_dir, from csv_path."""
    frame = read_measurements(csv_path)
    limits = out_dir / "machine_limits.json"
    machine = json.loads(limits.read_text()) if limits.exists() else None
    ok = frame[frame.status == "ok"]
    distributed = "ranks" in frame and (frame.ranks > 1).any()
    threads = _unique(ok[ok.ranks == 1] if distributed else ok, "threads")
    kernel = _unique(ok, "cpu_fp32_matmul")  # n/a in measurements made before llama/matmul.py
    fp32 = f"; fp32 matmuls through {kernel} (llama/matmul.py)" if kernel not in ("n/a", "") else ""
    device = f"{_unique(frame, 'device')} ({_unique(ok, 'device_name')}, {threads} threads{fp32})"
    versions = f"python {_unique(ok, 'python')}, torch {_unique(ok, 'torch')}, numpy {_unique(ok, 'numpy')}"
    if (frame["stack"] == "hf").any():
        versions += f", transformers {_unique(ok, 'transformers')}, peft {_unique(ok, 'peft')}"
    title = f"{_unique(frame, 'model')} on {device}"
    plot_peak_and_time(frame, out_dir / "peak_and_time.png", title)
    plot_breakdown(frame, out_dir / "memory_breakdown.png", title)
    timelines = {
        p.stem.removeprefix("timeline_ours_"): json.loads(p.read_text())
        for p in sorted(out_dir.glob("timeline_ours_*.json"))
    }
    timelines = dict(sorted(timelines.items(), key=lambda kv: kv[0] != VANILLA.name))
    if timelines:
        plot_timelines(timelines, out_dir / "timeline.png", title)
    lines = [
        "# Fine-tuning benchmark",
        "",
        f"Generated by `python benchmark_finetuning.py --report_only` from `{csv_path.name}`; measured with:",
        "",
        f"    {_unique(frame, 'command')}",
        "",
        f"- **device**: {device}",
        "- **dtype**: full fine-tuning keeps fp32 master weights; LoRA runs hold the frozen base as the *weights "
        "held in* column says (project/frozen_base.py) and the adapters, their gradients and optimizer state in "
        + (
            f"fp32; mixed precision = {_unique(frame[frame.amp], 'precision')} autocast"
            + (" + GradScaler" if (frame.precision == "fp16").any() else "")
            if frame.amp.any()
            else "fp32 (no mixed-precision configuration in this run)"
        )
        + "; the loss is fp32 everywhere",
        f"- **versions**: {versions}; commit {_unique(frame, 'commit')}",
        f"- **allocator**: {_unique(frame, 'allocator')}",
        f"- **model**: {_unique(frame, 'model')}; batch size 1; optimizer {_unique(frame, 'optimizer')} "
        f"(lr {_unique(frame, 'lr')}); LoRA {_unique(frame[frame.lora], 'lora_setup')}",
        f"- **data**: {_unique(frame, 'data')}, the same token ids for every configuration",
        f"- **timing**: {_unique(frame, 'warmup_steps')} warm-up optimizer step(s) of one micro-batch each "
        f"excluded, then {_unique(frame, 'passes')} pass(es) over the fixed set; weight loading excluded; "
        "mean ± standard deviation",
        "",
        "## Table 3: every configuration",
        "",
        *table3_section(frame),
        "",
        "## Table 2: what each technique does to each part of memory",
        "",
        *table2_section(frame),
        "",
        "## Memory by what holds it",
        "",
        *breakdown_section(frame),
        "",
        *(["## Against the machine's compute floor", "", *floor_section(frame, machine), ""] if machine else []),
        *(["## Several processes (torchrun)", "", *ranks_section(frame), ""] if distributed else []),
        "![peak memory and time](peak_and_time.png)",
        "",
        "![memory breakdown](memory_breakdown.png)",
        "",
    ]
    if timelines:
        lines += [
            "## Memory timeline of one optimizer step",
            "",
            "Live bytes by category (torch.profiler's memory timeline) through one step of "
            f"{', '.join(timelines)}; dashed lines: forward starts, backward reaches the model's output, "
            "optimizer step.",
            "",
            "![memory timeline](timeline.png)",
            "",
        ]
    lines += [f"Raw measurements: [`{csv_path.name}`]({csv_path.name}) (one row per configuration and stack)."]
    path = out_dir / "README.md"
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path
