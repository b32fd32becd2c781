"""Phase 3: fine-tuning — the code, the run (settings, LoRA's share, loss, outputs before/after), Tables 3 and 2.

Inputs, read as the project writes them: the run's folder (reports/finetune: summary.json, train_log.jsonl and
samples.json, from project/finetune.py) and the benchmark's measurements.csv (reports/finetune_benchmark).
Rendering belongs to their owners: the run's settings, result, loss plot and sample table to
project/reports/finetune_run.py; Tables 3 and 2, the memory breakdown and the plots (linked, not redrawn) to
project.bench.finetune.report, exactly as in the benchmark's README.md. This module adds the code links, the
LoRA and checkpointing explanations, and the "Reading." sentences computed from the measurements' columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from llama.checkpoint import SHAPES, atomic_write
from llama.model import Transformer
from project.bench.finetune import report
from project.bench.finetune.configs import VANILLA
from project.checkpointing import checkpoint_blocks
from project.model.lora import LoRAConfig, apply_lora, count_parameters
from project.train import read_log

from . import facts, finetune_run, md

RUN_FILES = ("summary.json", "train_log.jsonl", "samples.json")  # written by python finetuning.py
MEASUREMENTS = "measurements.csv"  # written by python benchmark_finetuning.py
RUN_COMMAND, BENCH_COMMAND = "python finetuning.py", "python benchmark_finetuning.py"
RECIPE_COMMAND = "make finetune-recipe"  # the Makefile holds the recipe's flags, the README explains them
REPEAT_DIR = "finetune_benchmark_fp32"  # beside the benchmark's folder: its fp32 rows measured over more passes
REPEAT_COMMAND = (
    "python benchmark_finetuning.py --configs vanilla,ckpt,lora,ckpt+lora,accum8 --passes 4 --compare hf --limits "
    f"--out reports/{REPEAT_DIR} --run_dir runs/{REPEAT_DIR}"
)


# ---- the code ---------------------------------------------------------------------------------------
def code_section(warnings: list) -> str:
    def link(path, symbol=None):
        return facts.link(path, symbol, warnings=warnings)

    return "\n".join(
        [
            f"- **Data** ({link('project/data.py')}): the Alpaca prompt templates "
            f"({link('project/data.py', 'format_prompt')}); prompt tokens labelled −100 and the response ending in the "
            f"EOS id ({link('project/data.py', 'tokenize_record')}); right-padding collator "
            f"({link('project/data.py', 'collate')}).",
            f"- **LoRA** ({link('project/model/lora.py', 'LoRALinear')}): a frozen linear layer plus B·A·(alpha/r), "
            f"A Kaiming-uniform, B zero so training starts from the base model; "
            f"{link('project/model/lora.py', 'apply_lora')} wraps the chosen projections and freezes the rest; "
            f"{link('project/model/lora.py', 'merge_lora')} folds the adapters back into the weights.",
            f"- **Training loop** ({link('project/train.py', 'train')}): shifted next-token cross-entropy summed over "
            f"label tokens and divided by the label tokens of the whole accumulation window "
            f"({link('project/train.py', 'micro_batch_backward')}), so accumulated gradients equal one large batch's; "
            f"autocast and GradScaler ({link('project/train.py', 'autocast')}, "
            f"{link('project/train.py', 'make_scaler')}); "
            f"the optimizer step ({link('project/train.py', 'optimizer_update')}); atomic checkpoints and `--resume` "
            f"({link('project/train.py', 'save_training_state')}).",
            f"- **Loss** ({link('project/loss.py', 'linear_cross_entropy')}): only label positions go through the "
            "output projection, a chunk at a time, with the softmax gradient computed in the forward when the output "
            "layer is frozen: no prompt logits and no full-vocabulary fp32 logits kept for backward.",
            f"- **Frozen base** ({link('project/frozen_base.py', 'resolve_base')}): a LoRA run under mixed "
            "precision holds its frozen base in the autocast dtype (no fp32 copy, no per-step cast), or quantized "
            f"to int8 / int4 on request (through {link('project/quant.py', 'QuantizedMatmul')}); adapters, their "
            "gradients and optimizer state are fp32, and full fine-tuning keeps fp32 master weights.",
            f"- **Held-out evaluation and schedules** ({link('project/data.py', 'split_heldout')}, "
            f"{link('project/train.py', 'evaluate')}, {link('project/train.py', 'lr_at')}): records chosen by a hash "
            "of their text never train; their loss is measured before, during and after training; warm-up then "
            "cosine or linear decay.",
            f"- **Several processes** ({link('project/distributed.py', 'wrap')}): torchrun with DDP or FSDP2 around "
            f"{link('project/train.py', 'NextTokenLoss')}; each rank takes its slice of the window one process would "
            "take, the loss is normalised by the window's label tokens over all ranks, checkpoints go through "
            "torch.distributed.checkpoint.",
            f"- **Exports** ({link('project/export.py', 'export_run')}, {link('llama/export.py', 'save_gguf')}): "
            "the adapter in peft's format, the merged model as a Hugging Face folder or a GGUF file for llama.cpp.",
            f"- **Gradient checkpointing** ({link('project/checkpointing.py', 'checkpoint_blocks')}): the policy picks "
            f"block indices; {link('project/checkpointing.py', 'apply_checkpointing')} wraps each chosen block's "
            "forward to run under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`; the model "
            "(`llama/model.py`) knows nothing of it.",
            f"- **CPU allocator** ({link('project/allocator.py', 'retain_freed_memory')}): keeps freed memory in the "
            "process instead of returning it to the OS every step.",
            f"- **Memory accounting** ({link('project/memory.py', 'SavedTensorMeter')}): bytes saved for backward, "
            "de-duplicated by storage, for Table 2.",
            f"- **Entry point**: {link('finetuning.py', 'main')}, over {link('project/finetune.py', 'finetune')}.",
        ]
    )


# ---- the run: settings, LoRA count, loss, samples ------------------------------------------------------
def read_run(folder: Path, warnings: list) -> tuple[dict | None, list[dict], list[dict] | None]:
    """(summary.json or None, the train_log.jsonl records, samples.json or None); each missing file is noted."""
    for name in RUN_FILES:
        if not (folder / name).exists():
            warnings.append(f"{md.shown_path(folder / name)} does not exist: run `{RUN_COMMAND}`")
    summary, log, samples = (folder / name for name in RUN_FILES)
    return (
        json.loads(summary.read_text()) if summary.exists() else None,
        read_log(log),
        json.loads(samples.read_text()) if samples.exists() else None,
    )


def finished_run(folder: Path) -> tuple[dict, list[dict], list[dict], list[dict] | None] | None:
    """(summary, step log, eval log, samples) of a run that finished in folder, else None (the caller's section
    says what is missing, so no warning here)."""
    summary, steps, samples = read_run(folder, [])
    if summary is None or not steps:
        return None
    return summary, steps, read_log(folder / "eval_log.jsonl"), samples


def absent(folder: Path, name: str, what: str) -> str:
    return md.missing(what, f"`{md.shown_path(folder / name)}` does not exist", RUN_COMMAND)


def lora_1b(lora: LoRAConfig = LoRAConfig()) -> dict:
    """The project's apply_lora on the 1B shape (meta device), and the count expected by hand."""
    args = SHAPES[facts.SHAPE]
    with torch.device("meta"):
        model = apply_lora(Transformer(args), lora)
    trainable, total = count_parameters(model)
    kv, r = args.n_kv_heads * args.head_dim, lora.r
    return {
        "trainable": trainable,
        "total": total,
        "r": r,
        "n_layers": args.n_layers,
        "dim": args.dim,
        "kv_dim": kv,
        "expected": args.n_layers * (r * (args.dim + args.dim) + r * (args.dim + kv)),
    }


def lora_section(summary: dict | None) -> str:
    out = []
    if summary is None:
        out.append("- **This run**: not recorded (no `summary.json` yet, see above).")
    else:
        t, total, lora = summary["trainable_params"], summary["total_params"], summary["lora"]
        setup = f"LoRA r {lora['r']} on {', '.join(lora['targets'])}" if lora else "full fine-tuning"
        out.append(
            f"- **This run** ({summary['model']}; {setup}): {t:,} trainable parameters of {total:,}, "
            f"**{100 * t / total:.3f} %**."
        )
    n = lora_1b()
    out.append(
        f"- **Llama 3.2-1B shape, r {n['r']} on wq, wv** (`apply_lora` + `count_parameters` on the meta device): "
        f"{n['trainable']:,} of {n['total']:,} (the {n['total'] - n['trainable']:,} base weights plus the adapters) = "
        f"**{100 * n['trainable'] / n['total']:.3f} %**; by hand, "
        f"{n['n_layers']} layers × (r·({n['dim']}+{n['dim']}) for wq + r·({n['dim']}+{n['kv_dim']}) for wv) with "
        f"r = {n['r']} is {n['expected']:,}"
        + (" — the same." if n["expected"] == n["trainable"] else " — they DIFFER.")
    )
    return "\n".join(out)


def loss_section(folder: Path, reports_dir: Path, summary: dict | None, steps: list[dict]) -> str:
    """loss_stats' bullets, the loss plot (drawn by finetune_run.plot_loss from the log) and a table of steps."""
    if not steps:
        return absent(folder, RUN_FILES[1], "the loss log")
    plot = reports_dir / "figures" / "phase_3_loss.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    title = finetune_run.loss_title(summary) if summary else md.shown_path(folder / RUN_FILES[1])
    finetune_run.plot_loss(steps, plot, title)
    low = min(steps, key=lambda s: s["loss"])
    every = max(1, len(steps) // 25)
    shown = steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])
    rows = [[s["step"], md.num(s["loss"], 4), md.num(s["step_s"]), md.num(s["tokens_per_s"], 0)] for s in shown]
    return "\n".join(
        [
            f"From `{md.shown_path(folder / RUN_FILES[1])}` (lowest loss {md.num(low['loss'], 4)} at step "
            f"{low['step']}):",
            "",
            *finetune_run.result_lines(finetune_run.loss_stats(steps)),
            "",
            f"![Training loss per optimizer step]({md.relative(plot, reports_dir)})",
            "",
            md.table(["Step", "Loss", "s / step", "tokens/s"], rows)
            + ("" if every == 1 else f"\n\n(every {every}th step and the last)"),
        ]
    )


# ---- the course's setting beside the recipe that learns ------------------------------------------------------
def signed(x: float) -> str:
    """A change with its sign, in scientific notation where four decimals would show zero."""
    return f"{x:+.4f}" if abs(x) >= 5e-4 or x == 0 else f"{x:+.1e}"


def run_row(summary: dict, steps: list[dict], evals: list[dict], samples: list[dict] | None) -> dict[str, str]:
    """One column of the side-by-side table, from one run's files."""
    t, r = summary["training"], finetune_run.loss_stats(steps, evals)
    lora = summary["lora"]
    warm = f", {t.get('warmup_steps', 0)} warm-up steps" if t.get("warmup_steps") else ""
    stopped = (
        f"{sum(bool(x.get('before_stopped')) for x in samples)} → {sum(bool(x.get('after_stopped')) for x in samples)}"
        f" of {len(samples)}"
        if samples and "after_stopped" in samples[0]
        else "not recorded"
    )
    same = f"{sum(x['before'] == x['after'] for x in samples)} of {len(samples)}" if samples else "n/a"
    held = (
        f"{md.num(r['heldout_loss_first'], 4)} → **{md.num(r['heldout_loss_last'], 4)}** "
        f"({signed(r['heldout_loss_last'] - r['heldout_loss_first'])}); perplexity "
        f"{md.num(r['heldout_ppl_first'])} → {md.num(r['heldout_ppl_last'])}"
        if evals
        else "not measured (run without held-out records)"
    )
    return {
        "command": f"`{summary['command']}`",
        "optimizer": f"{t['optimizer']}, lr {t['lr']}, {t.get('lr_schedule', 'constant')}{warm}",
        "LoRA": f"{', '.join(lora['targets'])} (r {lora['r']}); {summary['trainable_params']:,} trainable"
        if lora
        else "off (full fine-tuning)",
        "training": f"{t['epochs']} epoch(s) of {summary['data']['examples']} examples; {r['steps']} optimizer steps",
        "training loss (first → last steps)": f"{md.num(r['loss_first_k'], 4)} → {md.num(r['loss_last_k'], 4)} "
        f"(means of {r['k']} steps)",
        "held-out loss": held,
        "sample outputs ending with EOS (before → after)": stopped,
        "sample outputs unchanged by training": same,
        "time per step": f"{md.num(r['step_s'])} s ({md.num(r['tokens_per_s'], 0)} tokens/s), {summary['device_name']}",
    }


def plot_heldout(runs: dict[str, tuple[dict, list[dict]]], path: Path):
    """Held-out loss of each run against the training examples it had seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (summary, evals) in runs.items():
        per_step = summary["training"]["batch_size"] * summary["training"]["grad_accum"]
        ax.plot([e["step"] * per_step for e in evals], [e["loss"] for e in evals], marker="o", label=name)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("held-out loss (mean token cross-entropy)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def runs_section(course_dir: Path, recipe_dir: Path, reports_dir: Path) -> str:
    """The course's setting and the recipe that learns, side by side, with both held-out curves."""
    runs = {}
    for name, folder, command in (("course setting", course_dir, RUN_COMMAND), ("recipe", recipe_dir, RECIPE_COMMAND)):
        run = finished_run(folder)
        if run is None:
            return md.missing(f"the {name} run", f"`{md.shown_path(folder)}` has no finished run", command)
        runs[name] = (folder, *run)
    columns = {name: run_row(*run[1:]) for name, run in runs.items()}
    rows = [[key, *(col[key] for col in columns.values())] for key in next(iter(columns.values()))]
    headers = ["", *(f"{name} (`{md.shown_path(run[0])}`)" for name, run in runs.items())]
    out = [md.table(headers, rows)]
    curves = {name: (run[1], run[3]) for name, run in runs.items() if run[3]}
    if curves:
        plot = reports_dir / "figures" / "phase_3_heldout.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_heldout(curves, plot)
        out += ["", f"![Held-out loss of both runs]({md.relative(plot, reports_dir)})"]
    course_summary, course_steps, course_evals = runs["course setting"][1:4]
    if course_evals:
        r = finetune_run.loss_stats(course_steps, course_evals)
        t = course_summary["training"]
        change = r["heldout_loss_last"] - r["heldout_loss_first"]
        out += [
            "",
            f"**Why the course's setting barely moves the model.** Plain SGD at lr {t['lr']} scales each gradient "
            f"by {t['lr']}; LoRA's B starts at zero, so after {r['steps']} steps the adapter adds only a tiny "
            f"B·A to the weights: the held-out loss changed by {signed(change)} "
            f"({signed(100 * change / r['heldout_loss_first'])} %). It stays the benchmark setting (Table 3) "
            "because it is the course's; the recipe (AdamW, whose steps are about lr in size whatever the gradient's "
            "scale, a learning rate suited to LoRA, warm-up and decay, more epochs and all seven projections) is "
            "what teaches the model the Alpaca format.",
        ]
    return "\n".join(out)


# ---- the recipe on a frozen base in fewer bits ----------------------------------------------------------------
LOW_BASES = ("bf16", "int8", "int4")  # make finetune-recipe-bases: the recipe with --base B, into <recipe>_B
BASES_COMMAND = "make finetune-recipe-bases"


def plot_bases(runs: dict[str, tuple[list[dict], list[dict]]], ref: dict[int, float], path: Path):
    """Training loss per optimizer step, its gap to the fp32 base's (ref: {step: loss}) at each step, and the
    held-out loss, of the recipe on each frozen base (runs: {base: (step log, eval log)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, gap_ax, held_ax) = plt.subplots(1, 3, figsize=(14, 4))
    for base, (steps, evals) in runs.items():
        train_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label=base, lw=1)
        same = [s for s in steps if s["step"] in ref]
        gap_ax.plot([s["step"] for s in same], [s["loss"] - ref[s["step"]] for s in same], label=base, lw=1)
        if evals:
            held_ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="o", label=base)
    labels = ("training loss (window mean)", "training loss − the fp32 base's", "held-out loss")
    for ax, what in zip((train_ax, gap_ax, held_ax), labels):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(title="frozen base")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def against(x: float, ref: float) -> str:
    return f"{md.num(x, 4)} ({signed(x - ref)}, {100 * (x - ref) / ref:+.2f} %)"


def bases_section(recipe_dir: Path, reports_dir: Path) -> str:
    """The recipe on an fp32 frozen base beside the same run on a bf16-stored, int8 and int4 base (QLoRA-style):
    what holding the base in fewer bits costs in loss, step by step, and what it saves in memory."""
    runs = {}
    for base in ("fp32", *LOW_BASES):
        folder = recipe_dir if base == "fp32" else recipe_dir.with_name(f"{recipe_dir.name}_{base}")
        run = finished_run(folder)
        if run is not None:
            runs[base] = (folder, *run[:3])
    if "fp32" not in runs or len(runs) == 1:
        return md.missing(
            "the recipe on a low-precision frozen base",
            f"`{md.shown_path(recipe_dir)}` and at least one of its `_bf16` / `_int8` / `_int4` runs are needed",
            f"{RECIPE_COMMAND} && {BASES_COMMAND}",
        )
    _, _, ref_steps, ref_evals = runs["fp32"]
    ref_loss = {s["step"]: s["loss"] for s in ref_steps}
    rows, notes = [], []
    for base, (folder, summary, steps, evals) in runs.items():
        stats = finetune_run.loss_stats(steps, evals)
        if [s["step"] for s in steps] != list(ref_loss):
            notes.append(f"{base}: {len(steps)} steps against the fp32 base's {len(ref_steps)}")
        worst = max((s for s in steps if s["step"] in ref_loss), key=lambda s: abs(s["loss"] - ref_loss[s["step"]]))
        held = (
            (against(evals[0]["loss"], ref_evals[0]["loss"]), against(evals[-1]["loss"], ref_evals[-1]["loss"]))
            if evals and ref_evals
            else ("not measured", "not measured")
        )
        rows.append(
            [
                f"{base} (`{md.shown_path(folder)}`)",
                summary.get("weights", "not recorded"),
                *held,
                md.num(sum(s["loss"] for s in steps) / len(steps), 4),
                "—" if base == "fp32" else f"{abs(worst['loss'] - ref_loss[worst['step']]):.4f} (step {worst['step']})",
                report.fmt_bytes(stats["max_memory_bytes"]),
                md.num(stats["step_s"]),
            ]
        )
    plot = reports_dir / "figures" / "phase_3_bases.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_bases({base: (run[2], run[3]) for base, run in runs.items()}, ref_loss, plot)
    ref = runs["fp32"][1]
    headers = ["Frozen base", "Held in", "Held-out loss before training (vs fp32 base)", "Held-out loss after"]
    headers += ["Mean training loss", "Largest gap to the fp32 base at one step", "Memory in use (max)", "s / step"]
    out = [
        f"The recipe above, run again with only `--base` changed: the same {ref['data']['examples']} examples in the "
        f"same order, the same seed, {len(ref_steps)} optimizer steps ({ref['model']}; "
        f"{ref['device_name']}). The held-out loss *before training* is the base's quantization error alone; "
        "*after*, what the adapters trained on that base reach. Commands: each folder's `summary.md`.",
        "",
        md.table(headers, rows),
        "",
        f"![Training and held-out loss on each frozen base]({md.relative(plot, reports_dir)})",
    ]
    if notes:
        out += ["", "Not the same number of steps, so not comparable step by step: " + "; ".join(notes) + "."]
    if "Q4_1" in ref["model"]:
        out += [
            "",
            "This model's weights were themselves stored as Q4_1 (4 bits, one scale and minimum per 32 weights) "
            "and dequantised on load, so int4 with groups of 32 re-quantizes weights that already sit on such a grid "
            "and loses little: on a checkpoint kept in full precision, int4 costs more than this table shows.",
        ]
    return "\n".join(out)


# ---- reading the benchmark --------------------------------------------------------------------------
def _span(xs: list[float]) -> str:
    return f"{min(xs):.2f}" if len(xs) == 1 else f"{min(xs):.2f}–{max(xs):.2f}"


def reading3(frame: pd.DataFrame) -> list[str]:
    """Extremes of Table 3, and what switching each technique on does across pairs differing only in it."""
    ours = frame[frame["stack"] == "ours"]
    ok = ours[ours.status == "ok"]
    if ok.empty:
        return ["- No configuration finished."]
    lo, hi = ok.loc[ok.peak_bytes.idxmin()], ok.loc[ok.peak_bytes.idxmax()]
    fast, slow = ok.loc[ok.step_s_mean.idxmin()], ok.loc[ok.step_s_mean.idxmax()]
    out = [
        f"- Lowest peak: **{lo.config}** at {report.fmt_bytes(lo.peak_bytes)}; highest: **{hi.config}** at "
        f"{report.fmt_bytes(hi.peak_bytes)} ({md.ratio(hi.peak_bytes / lo.peak_bytes)}).",
        f"- Fastest optimizer step: **{fast.config}** at {fast.step_s_mean:.3f} s; slowest: **{slow.config}** at "
        f"{slow.step_s_mean:.3f} s.",
    ]
    by_on = {}
    for _, r in ok.iterrows():
        by_on.setdefault(report.techniques_on(r), r)
    for name, key in report.TECHNIQUES:
        pairs = [(r, by_on[on | {key}]) for on, r in by_on.items() if key not in on and on | {key} in by_on]
        if pairs:
            peaks = [b.peak_bytes / a.peak_bytes for a, b in pairs]
            times = [b.step_s_mean / a.step_s_mean for a, b in pairs]
            out.append(
                f"- Switching on **{name}** ({len(pairs)} pair{'s' if len(pairs) > 1 else ''} of configurations "
                f"differing only in it): peak × {_span(peaks)}, time per optimizer step × {_span(times)}."
            )
    failed = [f"{r.config} ({r.status})" for _, r in ours.iterrows() if r.status != "ok"]
    if failed:
        out.append("- Did not finish (×): " + ", ".join(failed) + ".")
    return out


def technique_notes(frame: pd.DataFrame) -> list[str]:
    """Each technique alone against vanilla: peak memory and time per optimizer step (Table 2's rows)."""
    ours = frame[frame["stack"] == "ours"]
    vanilla = ours[(ours.config == VANILLA.name) & (ours.status == "ok")]
    if vanilla.empty:
        return ["- No successful vanilla run to compare with."]
    v, out = vanilla.iloc[0], []
    for name, key in report.TECHNIQUES:
        r = report.technique_config(frame, key)
        if r is None:
            out.append(f"- **{name}**: not measured alone.")
        elif r.status != "ok":
            out.append(f"- **{name}** ({r.config}): {r.status}, nothing to compare.")
        else:
            out.append(
                f"- **{name}** ({r.config}) alone: peak {report.fmt_bytes(v.peak_bytes)} → "
                f"{report.fmt_bytes(r.peak_bytes)} ({md.ratio(r.peak_bytes / v.peak_bytes)}), time per optimizer "
                f"step {v.step_s_mean:.3f} → {r.step_s_mean:.3f} s ({md.ratio(r.step_s_mean / v.step_s_mean)})."
            )
    return out


def tables(frame: pd.DataFrame) -> list[str]:
    """Table 3, Table 2 and the breakdown as the benchmark renders them, with the readings of Tables 3 and 2."""
    return [
        "### Table 3: peak memory and time per step for each configuration",
        "",
        *report.table3_section(frame),
        "",
        "**Reading.**",
        "",
        *reading3(frame),
        "",
        "### Table 2: what each technique does to each part of memory",
        "",
        *report.table2_section(frame),
        "",
        "**Reading.**",
        "",
        *technique_notes(frame),
        "",
        "### Memory by what holds it",
        "",
        *report.breakdown_section(frame),
        "",
    ]


def measurements(path: Path) -> pd.DataFrame:
    """measurements.csv; EmptyDataError when it has no rows."""
    frame = report.read_measurements(path)
    if not len(frame):
        raise pd.errors.EmptyDataError("no rows")
    return frame


def read_measurements(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """(measurements.csv, its Tables 3 and 2 with their readings); EmptyDataError when it has no rows."""
    frame = measurements(path)
    return frame, tables(frame)


def benchmark_section(folder: Path, reports_dir: Path, warnings: list) -> tuple[str, str]:
    """(provenance line, Tables 3 and 2 with their readings, the breakdown and the plots) from measurements.csv."""
    path = folder / MEASUREMENTS
    shown = md.shown_path(path)
    read, failed = md.read_results(
        path, read_measurements, "Tables 2 and 3", "fine-tuning benchmark", BENCH_COMMAND, warnings
    )
    if failed:
        return failed
    frame, out = read
    limits = folder / "machine_limits.json"
    if limits.exists():
        out += [
            "### Against the machine's compute floor",
            "",
            *report.floor_section(frame, json.loads(limits.read_text())),
            "",
        ]
    plots = [(folder / name, caption) for name, caption in report.PLOTS.items() if (folder / name).exists()]
    if plots:
        out += ["### Plots", ""] + [f"![{caption}]({md.relative(p, reports_dir)})\n" for p, caption in plots]
    prov = (
        f"fine-tuning benchmark `{shown}` ({len(frame)} rows): {md.distinct(frame, 'model')}, device "
        f"{md.distinct(frame, 'device')} ({md.distinct(frame, 'device_name')}), torch {md.distinct(frame, 'torch')}, "
        f"commit {md.distinct(frame, 'commit')}, allocator {md.distinct(frame, 'allocator')}; command "
        f"`{md.distinct(frame, 'command')}`"
    )
    return prov, "\n".join(out)


def repeat_section(folder: Path, warnings: list) -> list[str]:
    """Table 3's rows measured again over more passes (a second run of the benchmark, in its own folder, which is
    optional: nothing when it is absent), beside transformers + peft: ratios with less of the machine's noise."""
    path = folder / MEASUREMENTS
    if not folder.exists():
        return []
    frame, failed = md.read_results(path, measurements, "the repeated rows", "repeat", REPEAT_COMMAND, warnings)
    heading = ["### Table 3's configurations again, over more passes", ""]
    if failed:
        return [*heading, failed[1], ""]
    micro = ", ".join(str(n) for n in sorted({int(n) for n in frame.get("micro_batches", pd.Series()).dropna()}))
    return [
        *heading,
        f"From `{md.shown_path(path)}` ({len(frame)} rows; {md.distinct(frame, 'device_name')}, commit "
        f"{md.distinct(frame, 'commit')}; command `{md.distinct(frame, 'command')}`): {md.distinct(frame, 'data')}, "
        f"{md.distinct(frame, 'passes')} passes over them ({micro} timed micro-batches a configuration), "
        "each configuration followed at once by its transformers + peft twin. A ratio of two runs is only as good as "
        "the machine was steady between them, and more micro-batches make each mean firmer; the ± includes the "
        "examples' different lengths.",
        "",
        *report.table3(frame),
        "",
    ]


def checkpointing_section(summary: dict | None, warnings: list) -> str:
    n = SHAPES[facts.SHAPE].n_layers
    rows = []
    for policy in ("none", "all", "every-2", "sqrt"):
        blocks = sorted(checkpoint_blocks(policy, n))
        rows.append([f"`{policy}`", len(blocks), ", ".join(map(str, blocks)) or "—"])
    ckpt = summary["grad_ckpt"] if summary else None
    return "\n".join(
        [
            "Checkpointing is placed at **transformer-block boundaries**: "
            f"{facts.link('project/checkpointing.py', 'apply_checkpointing', warnings=warnings)} wraps each chosen "
            "block's forward, on that instance only, so that it runs under `torch.utils.checkpoint` while autograd "
            "records (the model itself knows nothing of it, and parameter names stay the same). A checkpointed "
            "block keeps only its input, one (B, T, D) tensor, and recomputes everything inside it "
            "during backward. The block is the natural unit: its input is the smallest tensor from which all of its "
            "internals (normed inputs, q, k, v, attention output, the SwiGLU hidden activations, four times wider "
            "than the model dimension in the 1B model) can be rebuilt, and every block has the same cost, so a policy "
            "is just a choice of indices. The price is one extra forward through each checkpointed block, about a "
            "third more compute for that block. Blocks chosen for the Llama 3.2-1B shape "
            f"({n} blocks) by {facts.link('project/checkpointing.py', 'checkpoint_blocks', warnings=warnings)}:",
            "",
            md.table(["Policy", "Blocks checkpointed", "Indices"], rows),
            "",
            "Each checkpointed block gives up its internal activations for one extra forward, so memory saved and "
            "compute added both grow with the number of checkpointed blocks: `all` saves the most and costs the most, "
            "`every-k` and `sqrt` sit in between. The benchmark measures `all` against none. Checkpointing only "
            "reduces activation memory, so it pays off when activations, not weights, gradients and optimizer state, "
            "dominate the peak — compare the activation column of Table 2 with the others, and the time per step "
            "in Table 3, before choosing a policy.",
            "",
            f"This run's setting: `{ckpt['policy']}` ({ckpt['blocks']} of {ckpt['of']} blocks)."
            if ckpt
            else "This run's setting: not recorded (no `summary.json` yet).",
        ]
    )


def build(
    reports_dir: Path, finetune_dir: Path, bench_dir: Path, env: dict, warnings: list, recipe_dir: Path | None = None
) -> str:
    summary, steps, samples = read_run(finetune_dir, warnings)
    recipe_dir = recipe_dir or finetune_dir.parent / "finetune_recipe"
    summary_path = md.shown_path(finetune_dir / RUN_FILES[0])
    run_prov = (
        f"fine-tuning run `{summary_path}` (device {summary['device']}, torch {summary['versions']['torch']}, "
        f"{finetune_run.precision_text(summary['training'])}; command `{summary['command']}`)"
        if summary
        else f"fine-tuning run in `{md.shown_path(finetune_dir)}` (no `summary.json` yet: settings not recorded)"
    )
    bench_prov, bench = benchmark_section(bench_dir, reports_dir, warnings)
    run = finetune_run.settings_lines(summary) if summary else [absent(finetune_dir, RUN_FILES[0], "the run's summary")]
    return (
        "\n".join(
            [
                "# Phase 3 — Fine-tuning on one machine: LoRA, mixed precision, accumulation, checkpointing",
                "",
                f"*Generated by `python -m project.reports` at commit {env['commit']} (torch {env['torch']}) from the "
                f"{run_prov} and the {bench_prov}.*",
                "",
                "## What fine-tuning adds to the code",
                "",
                code_section(warnings),
                "",
                "## The fine-tuning run",
                "",
                *run,
                "",
                "## LoRA: trainable parameters",
                "",
                lora_section(summary),
                "",
                "## Training loss",
                "",
                loss_section(finetune_dir, reports_dir, summary, steps),
                "",
                "## Outputs before and after fine-tuning",
                "",
                "Greedy outputs for fixed and held-out prompts, before and after the run:\n\n"
                + finetune_run.samples_markdown(samples)
                if samples is not None
                else absent(finetune_dir, RUN_FILES[2], "outputs before and after"),
                "",
                "## The course's setting beside a recipe that learns",
                "",
                runs_section(finetune_dir, recipe_dir, reports_dir),
                "",
                "## The recipe on a frozen base in fewer bits (QLoRA-style): what it costs in loss",
                "",
                bases_section(recipe_dir, reports_dir),
                "",
                "## Fine-tuning benchmark",
                "",
                bench,
                "",
                *repeat_section(bench_dir.parent / REPEAT_DIR, warnings),
                "## Gradient checkpointing: where and why",
                "",
                checkpointing_section(summary, warnings),
            ]
        ).rstrip()
        + "\n"
    )
