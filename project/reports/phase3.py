"""Phase 3: fine-tuning — the code changes, LoRA's trainable share, the loss, outputs before/after, Tables 2 and 3."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from llama.checkpoint import SHAPES, atomic_write
from llama.model import Transformer

from . import facts, md
from .inputs import (EXTRA_PARTS, FINETUNE, FINETUNE_BENCH, MEMORY_PARTS, TECHNIQUES, find_file, load_results, read_json, read_summary,
                     read_table, rename_keys)  # fmt: skip

FLAGS = list(TECHNIQUES.values())
SHORT = {"grad_ckpt": "ckpt", "mixed_precision": "AMP", "lora": "LoRA", "grad_accum": "accum"}


# ---- the code ---------------------------------------------------------------------------------------
def code_section(warnings: list) -> str:
    def link(path, symbol=None):
        return facts.link(path, symbol, warnings=warnings)

    return "\n".join(
        [
            f"- **Data** ({link('project/data.py')}): the Alpaca prompt templates ({link('project/data.py', 'format_prompt')}); "
            f"prompt tokens labelled −100 and the response ending in the EOS id ({link('project/data.py', 'tokenize_record')}); "
            f"right-padding collator ({link('project/data.py', 'collate')}).",
            f"- **LoRA** ({link('project/model/lora.py', 'LoRALinear')}): a frozen linear layer plus B·A·(alpha/r), "
            f"A Kaiming-uniform, B zero so training starts from the base model; "
            f"{link('project/model/lora.py', 'apply_lora')} wraps the chosen projections and freezes the rest; "
            f"{link('project/model/lora.py', 'merge_lora')} folds the adapters back into the weights.",
            f"- **Training loop** ({link('project/train.py', 'train')}): shifted next-token cross-entropy summed over "
            f"label tokens and divided by the label tokens of the whole accumulation window "
            f"({link('project/train.py', 'micro_batch_backward')}), so accumulated gradients equal one large batch's; "
            f"autocast and GradScaler ({link('project/train.py', 'autocast')}, {link('project/train.py', 'make_scaler')}); "
            f"the optimizer step ({link('project/train.py', 'optimizer_update')}); atomic checkpoints and `--resume` "
            f"({link('project/train.py', 'save_training_state')}).",
            f"- **Gradient checkpointing** ({link('project/checkpointing.py', 'checkpoint_blocks')}): the policy picks "
            f"block indices; {link('llama/model.py', 'Transformer.forward')} runs those blocks under "
            "`torch.utils.checkpoint(use_reentrant=False)`.",
            f"- **CPU allocator** ({link('project/allocator.py', 'retain_freed_memory')}): keeps freed memory in the "
            "process instead of returning it to the OS every step.",
            f"- **Memory accounting** ({link('project/memory.py', 'SavedTensorMeter')}): bytes saved for backward, "
            "de-duplicated by storage, for Table 2.",
            f"- **Entry point**: {link('finetuning.py', 'main')}.",
        ]
    )


# ---- LoRA count ---------------------------------------------------------------------------------------
def lora_1b(r: int = 16, targets=("wq", "wv")) -> dict | None:
    """The project's apply_lora on the 1B shape (meta device), and the count expected by hand."""
    try:
        from project.model.lora import LoRAConfig, apply_lora, count_parameters
    except ImportError:
        return None
    args = SHAPES[facts.SHAPE]
    with torch.device("meta"):
        model = apply_lora(Transformer(args), LoRAConfig(r=r, targets=targets))
    trainable, total = count_parameters(model)
    kv = args.n_kv_heads * args.head_dim
    return {"trainable": trainable, "total": total, "r": r, "n_layers": args.n_layers, "dim": args.dim, "kv_dim": kv,
            "expected": args.n_layers * (r * (args.dim + args.dim) + r * (args.dim + kv))}  # fmt: skip


def lora_section(summary: dict | None) -> str:
    out = []
    if summary and summary.get("trainable"):
        m = re.search(FINETUNE["trainable_pattern"], str(summary["trainable"]))
        if m:
            out.append(
                f"- **This run** ({summary.get('model', 'model not recorded')}; LoRA {summary.get('lora', 'n/a')}): "
                f"{m.group(1)} trainable parameters of {m.group(2)}, **{m.group(3)} %**."
            )
        else:
            out.append(f"- **This run**: {summary['trainable']}")
    else:
        out.append(f"- This run: {md.missing('the fine-tuning run', 'no summary found', FINETUNE['command'])}")
    big = lora_1b()
    if big:
        n = big
        out.append(
            f"- **Llama 3.2-1B shape, same settings** (`apply_lora` + `count_parameters` on the meta device): "
            f"{n['trainable']:,} of {n['total']:,} (the {n['total'] - n['trainable']:,} base weights plus the adapters) = "
            f"**{100 * n['trainable'] / n['total']:.3f} %**; by hand, "
            f"{n['n_layers']} layers × (r·({n['dim']}+{n['dim']}) for wq + r·({n['dim']}+{n['kv_dim']}) for wv) with "
            f"r = {n['r']} is {n['expected']:,}" + (" — the same." if n["expected"] == n["trainable"] else " — they DIFFER.")
        )
    return "\n".join(out)


# ---- loss ------------------------------------------------------------------------------------------------
def plot_loss(log: pd.DataFrame, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(log["step"], log["loss"], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per label token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)


def loss_section(folder: Path, reports_dir: Path) -> str:
    path = find_file(folder, FINETUNE["loss_log"])
    if path is None:
        return md.missing("the loss log", f"no log in `{md.shown_path(folder)}`", FINETUNE["command"])
    log, problem = read_table(path, FINETUNE["loss_columns"], ["step", "loss"])
    if log is None:
        return md.missing("the loss log", problem, FINETUNE["command"])
    plot = reports_dir / "figures" / "phase_3_loss.png"
    plot_loss(log, plot)
    k = max(1, min(5, len(log) // 4))
    first, last = log["loss"].head(k).mean(), log["loss"].tail(k).mean()
    cols = [c for c in ("step_s", "tokens_per_s") if c in log.columns]
    every = max(1, len(log) // 25)
    shown = log.iloc[::every]
    if shown.index[-1] != log.index[-1]:
        shown = pd.concat([shown, log.tail(1)])
    rows = [[int(r["step"]), md.num(r["loss"], 4)] + [md.num(r[c], 2 if c == "step_s" else 0) for c in cols]
            for _, r in shown.iterrows()]  # fmt: skip
    headers = ["Step", "Loss"] + [{"step_s": "s / step", "tokens_per_s": "tokens/s"}[c] for c in cols]
    return "\n".join(
        [
            f"From `{md.shown_path(path)}`: {len(log)} optimizer steps. Loss of the first step "
            f"{md.num(log['loss'].iloc[0], 4)}, of the last {md.num(log['loss'].iloc[-1], 4)}; mean of the first {k} "
            f"steps {md.num(first, 4)}, of the last {k} {md.num(last, 4)} ({last - first:+.4f}), lowest "
            f"{md.num(log['loss'].min(), 4)} at step {int(log.loc[log['loss'].idxmin(), 'step'])}.",
            "",
            f"![Training loss per optimizer step]({md.relative(plot, reports_dir)})",
            "",
            md.table(headers, rows) + ("" if every == 1 else f"\n\n(every {every}th step and the last)"),
        ]
    )


def samples_section(folder: Path) -> str:
    path = find_file(folder, FINETUNE["samples"])
    if path is None:
        return md.missing("outputs before and after", f"no samples file in `{md.shown_path(folder)}`", FINETUNE["command"])
    records = [rename_keys(r, FINETUNE["sample_keys"]) for r in read_json(path)]
    out = [f"Greedy outputs for fixed prompts (from `{md.shown_path(path)}`):"]
    for i, r in enumerate(records, 1):
        prompt = r.get("prompt", "?") + (f" — input: {r['input']}" if r.get("input") else "")
        out += [f"\n**Prompt {i}:** {prompt}\n", f"- *before*: {r.get('before', 'n/a')!r}",
                f"- *after*: {r.get('after', 'n/a')!r}"]  # fmt: skip
    return "\n".join(out)


# ---- Tables 2 and 3 -------------------------------------------------------------------------------------
def flags(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    offs = FINETUNE_BENCH["off_values"]
    for f in FLAGS:
        off = set(offs.get(f, offs["default"]))
        frame[f] = frame[f].map(lambda v: str(v).strip().lower() not in off) if f in frame.columns else False
    frame["ok"] = frame["status"].astype(str).str.strip().str.lower() == "ok"
    return frame


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    keys = FLAGS + (["runner"] if "runner" in frame.columns else [])  # the config name follows from the flags
    metrics = [c for c in ("step_s", "micro_s", "step_s_std", "peak_mib", "peak_above_baseline_mib", *MEMORY_PARTS.values(),
                           *EXTRA_PARTS.values())
               if c in frame.columns]  # fmt: skip
    rows = []
    for key, g in frame.groupby(keys, dropna=False, sort=False):
        ok = g[g["ok"]]
        row = dict(zip(keys, key))
        row["ok"] = not ok.empty
        row["status"] = "ok" if row["ok"] else "/".join(sorted(set(g["status"].astype(str))))
        for m in metrics:
            row[m] = ok[m].astype(float).mean() if not ok.empty else float("nan")
        rows.append(row)
    # The benchmark's own order: fewer techniques first, then checkpointing, mixed precision, LoRA, accumulation.
    rows.sort(key=lambda r: (sum(bool(r[f]) for f in FLAGS[:3]), bool(r["grad_accum"]), *(not r[f] for f in FLAGS[:3])))
    return pd.DataFrame(rows)


def label(row) -> str:
    on = [SHORT[f] for f in FLAGS if row[f]]
    return " + ".join(on) if on else "vanilla"


def table3(conf: pd.DataFrame) -> str:
    mark = lambda b: "✓" if b else "−"  # noqa: E731
    cols = [(c, h, d) for c, h, d in (("peak_mib", "Peak (MiB)", 0), ("peak_above_baseline_mib", "Above baseline (MiB)", 0),
            ("step_s", "s / step", 2), ("micro_s", "s / micro-batch", 2)) if c in conf.columns]  # fmt: skip
    rows = []
    for _, r in conf.iterrows():
        cells = [md.OOM if not r["ok"] else md.num(r[c], d) for c, _, d in cols]
        rows.append([label(r)] + [mark(r[f]) for f in FLAGS] + cells)
    return md.table(["Configuration"] + list(TECHNIQUES) + [h for _, h, _ in cols], rows)


def breakdown(conf: pd.DataFrame) -> str | None:
    parts = [(name, col) for name, col in {**MEMORY_PARTS, **EXTRA_PARTS}.items() if col in conf.columns]
    if not parts:
        return None
    rows = [[label(r)] + [md.OOM if not r["ok"] else md.num(md.mib(r[c]), 1) for _, c in parts]
            + ([md.num(r["peak_mib"], 0) if r["ok"] else md.OOM]) for _, r in conf.iterrows()]  # fmt: skip
    return md.table(["Configuration"] + [f"{n} (MiB)" for n, _ in parts] + ["Peak (MiB)"], rows)


def find_config(conf: pd.DataFrame, on: set[str]):
    match = conf[[all(r[f] == (f in on) for f in FLAGS) for _, r in conf.iterrows()]]
    return None if match.empty else match.iloc[0]


def arrow(before: float, after: float, threshold: float) -> str:
    if before == 0:
        return "−" if after == 0 else "↑"
    change = (after - before) / before
    return "−" if abs(change) < threshold else "↑" if change > 0 else "↓"


def table2(conf: pd.DataFrame) -> tuple[str, list[str]]:
    """Arrows per technique and memory part, each from only-that-technique versus vanilla; plus the sentences."""
    threshold = FINETUNE_BENCH["threshold"]
    vanilla = find_config(conf, set())
    parts = [(n, c) for n, c in MEMORY_PARTS.items() if c in conf.columns]
    rows, notes = [], []
    for name, flag in TECHNIQUES.items():
        other = find_config(conf, {flag})
        cells = []
        for part, col in parts:
            if vanilla is None or other is None or not vanilla["ok"] or not other["ok"]:
                cells.append("n/a")
                continue
            a, b = md.mib(vanilla[col]), md.mib(other[col])
            change = f" ({100 * (b - a) / a:+.0f} %)".replace("-", "−") if a else ""
            cells.append(f"{arrow(a, b, threshold)} {md.num(a, 1)} → {md.num(b, 1)}{change}")
        rows.append([name] + cells)
        if other is not None and vanilla is not None and other["ok"] and vanilla["ok"]:
            notes.append(
                f"- **{name}** alone: peak {md.num(vanilla['peak_mib'], 0)} → {md.num(other['peak_mib'], 0)} MiB "
                f"({md.ratio(other['peak_mib'] / vanilla['peak_mib'])}), time per optimizer step "
                f"{md.num(vanilla['step_s'])} → {md.num(other['step_s'])} s ({md.ratio(other['step_s'] / vanilla['step_s'])})."
            )
        else:
            notes.append(f"- **{name}**: no successful pair of runs (vanilla and {name.lower()} alone) to compare.")
    return md.table(["Technique (alone vs vanilla)"] + [f"{n} (MiB)" for n, _ in parts], rows), notes


def reading3(conf: pd.DataFrame) -> list[str]:
    ok = conf[conf["ok"]]
    if ok.empty:
        return ["- No configuration finished."]
    lo, hi = ok.loc[ok["peak_mib"].idxmin()], ok.loc[ok["peak_mib"].idxmax()]
    fast, slow = ok.loc[ok["step_s"].idxmin()], ok.loc[ok["step_s"].idxmax()]
    out = [
        f"- Lowest peak: **{label(lo)}** at {md.num(lo['peak_mib'], 0)} MiB; highest: **{label(hi)}** at "
        f"{md.num(hi['peak_mib'], 0)} MiB ({md.ratio(hi['peak_mib'] / lo['peak_mib'])}).",
        f"- Fastest step: **{label(fast)}** at {md.num(fast['step_s'])} s; slowest: **{label(slow)}** at "
        f"{md.num(slow['step_s'])} s.",
    ]
    for name, flag in TECHNIQUES.items():
        peaks, times = [], []
        for _, r in ok.iterrows():
            if r[flag]:
                continue
            on = {f for f in FLAGS if r[f]} | {flag}
            twin = find_config(ok, on)
            if twin is not None:
                peaks.append(twin["peak_mib"] / r["peak_mib"])
                times.append(twin["step_s"] / r["step_s"])
        if peaks:
            def span(xs):
                return f"{min(xs):.2f}" if len(xs) == 1 else f"{min(xs):.2f}–{max(xs):.2f}"

            out.append(
                f"- Switching on **{name}** ({len(peaks)} pair{'s' if len(peaks) > 1 else ''} of configurations "
                f"differing only in it): peak × {span(peaks)}, time per step × {span(times)}."
            )
    failed = [f"{label(r)} ({r['status']})" for _, r in conf.iterrows() if not r["ok"]]
    if failed:
        out.append(f"- Failed ({md.OOM}): " + ", ".join(failed) + ".")
    return out


def benchmark_section(folder: Path, reports_dir: Path, warnings: list) -> tuple[str, str]:
    cfg = FINETUNE_BENCH
    path, frame, failed = load_results(folder, cfg, "Tables 2 and 3", "fine-tuning benchmark", warnings)
    if failed:
        return failed
    frame = flags(frame)
    conf = aggregate(frame)
    ours = conf[conf["runner"].astype(str) == "ours"] if "runner" in conf.columns and (conf["runner"].astype(str) == "ours").any() else conf
    commands = md.distinct(frame, "command") if "command" in frame.columns else cfg["command"]
    prov = (
        f"fine-tuning benchmark `{md.shown_path(path)}` ({len(frame)} rows): device {md.distinct(frame, 'device')}, "
        f"dtype {md.distinct(frame, 'dtype')}, torch {md.distinct(frame, 'torch')}, commit {md.distinct(frame, 'commit')}, "
        f"allocator {md.distinct(frame, 'allocator')}; command `{commands}`"
    )
    t2, notes = table2(ours)
    out = [
        "### Table 3: peak memory and time per step for each combination",
        "",
        f"Means over the measured steps; {md.OOM} = out of memory or failed; ✓ = technique on.",
        "",
        table3(ours),
        "",
    ]
    parts = breakdown(ours)
    if parts:
        out += ["Memory by what holds it (measured tensor bytes):", "", parts, ""]
    out += ["**Reading.**", "", *reading3(ours), "",
            "### Table 2: what each technique does to each kind of memory", "",
            f"Each technique alone against the vanilla run, from the measured parts above: ↑ more, ↓ less, − a change "
            f"smaller than {FINETUNE_BENCH['threshold']:.0%} of the vanilla value; numbers are vanilla → with the technique.",
            "", t2, "", "**Reading.**", "", *notes, ""]  # fmt: skip
    compare = compare_section(conf)
    if compare:
        out += ["### Against Hugging Face transformers + peft (`--compare hf`)", "",
                "Same weights, examples, autocast, LoRA settings and optimizer; ratio > 1 means the other stack is "
                "slower or larger.", "", compare, ""]  # fmt: skip
    plots = sorted(folder.glob("*.png"))
    if plots:
        out += ["### Plots", ""] + [f"![{p.stem.replace('_', ' ')}]({md.relative(p, reports_dir)})\n" for p in plots]
    return prov, "\n".join(out)


def compare_section(conf: pd.DataFrame) -> str | None:
    """Each configuration on our stack beside the other stack(s) in the results."""
    if "runner" not in conf.columns or conf["runner"].nunique() < 2:
        return None
    runners = sorted(conf["runner"].astype(str).unique())
    ours = "ours" if "ours" in runners else runners[0]
    rows = []
    for _, a in conf[conf["runner"].astype(str) == ours].iterrows():
        on = {f for f in FLAGS if a[f]}
        for other in (r for r in runners if r != ours):
            b = find_config(conf[conf["runner"].astype(str) == other], on)
            if b is None:
                continue
            both = a["ok"] and b["ok"]
            rows.append([label(a), other,
                         md.OOM if not a["ok"] else md.num(a["step_s"]), md.OOM if not b["ok"] else md.num(b["step_s"]),
                         md.ratio(b["step_s"] / a["step_s"]) if both else "n/a",
                         md.OOM if not a["ok"] else md.num(a["peak_mib"], 0), md.OOM if not b["ok"] else md.num(b["peak_mib"], 0),
                         md.ratio(b["peak_mib"] / a["peak_mib"]) if both else "n/a"])  # fmt: skip
    if not rows:
        return None
    return md.table(["Configuration", "Other", f"{ours} s / step", "other s / step", "time ratio",
                     f"{ours} peak (MiB)", "other peak (MiB)", "peak ratio"], rows)  # fmt: skip


def checkpointing_section(summary: dict | None, warnings: list) -> str:
    try:
        from project.checkpointing import checkpoint_blocks
    except ImportError:
        return "`project/checkpointing.py` is not written yet."
    n = SHAPES[facts.SHAPE].n_layers
    rows = []
    for policy in ("none", "all", "every-2", "sqrt"):
        blocks = sorted(checkpoint_blocks(policy, n))
        rows.append([f"`{policy}`", len(blocks), ", ".join(map(str, blocks)) or "—"])
    used = summary.get("grad_ckpt") if summary else None
    return "\n".join(
        [
            f"Checkpointing is placed at **transformer-block boundaries** ({facts.link('llama/model.py', 'Transformer.forward', warnings=warnings)}): "
            "a checkpointed block keeps only its input, one (B, T, D) tensor, and recomputes everything inside it "
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
            f"This run's setting: {used}." if used else "This run's setting: not recorded (no summary yet).",
        ]
    )


def build(reports_dir: Path, finetune_dir: Path, bench_dir: Path, env: dict, warnings: list) -> str:
    summary_path = find_file(finetune_dir, FINETUNE["summary"])
    summary = rename_keys(read_summary(summary_path), FINETUNE["summary_keys"]) if summary_path else None
    run_prov = (
        f"fine-tuning run `{md.shown_path(summary_path)}` (device {summary.get('device', 'not recorded')}; "
        f"{summary.get('versions', 'versions not recorded')}; precision {summary.get('precision', 'not recorded')}; "
        f"command {summary.get('command', 'not recorded')})"
        if summary
        else "fine-tuning run: none yet"
    )
    bench_prov, bench = benchmark_section(bench_dir, reports_dir, warnings)
    return "\n".join(
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
            "## LoRA: trainable parameters",
            "",
            lora_section(summary),
            "",
            "## Training loss",
            "",
            loss_section(finetune_dir, reports_dir),
            "",
            "## Outputs before and after fine-tuning",
            "",
            samples_section(finetune_dir),
            "",
            "## Fine-tuning benchmark",
            "",
            bench,
            "",
            "## Gradient checkpointing: where and why",
            "",
            checkpointing_section(summary, warnings),
        ]
    ).rstrip() + "\n"
