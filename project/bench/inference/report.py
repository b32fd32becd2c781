"""Table 1 and its companions, rendered from the summary (results.summarize of results.csv, = summary.csv): the
one renderer for the inference benchmark's report.md and for the phase 2 report (project/reports/phase2.py),
which calls `tables`, `by_output_len` and links the PNGs named in PLOTS. Nothing here measures anything."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llama.checkpoint import atomic_write
from project.bench.inference.llamacpp import GGUF_FOR
from project.bench.inference.quality import GREEDY_TOKENS, PROMPTS

STACK_NAMES = {"ours": "ours (llama/)", "hf": "Hugging Face transformers", "llamacpp": "llama.cpp"}


def stack_name(stack: str, quantize: str = "none", decode: str = "eager") -> str:
    """'ours (llama/)', 'ours (llama/), int8 weights, compiled decode', 'ours (llama/), compiled decode
    (max-autotune-no-cudagraphs)' (a torch.compile mode besides the default), 'Hugging Face transformers', 'llama.cpp,
    Q8_0 weights' (llama.cpp's counterpart of our int8)."""
    if stack == "llamacpp":
        kind = GGUF_FOR.get(quantize.split("-")[0])
        return STACK_NAMES[stack] + (f", {kind.upper()} weights" if kind else ", unquantized GGUF")
    weights = f", {quantize} weights" if quantize != "none" else ""
    compiled = ", " + decode.replace("compiled", "compiled decode", 1) if decode != "eager" else ""
    return STACK_NAMES.get(stack, stack) + weights + compiled


VARIANT = ["stack", "quantize", "decode"]  # what tells two rows of one configuration apart


PLOTS = {"batch_size": "vs_batch_size.png", "output_len": "vs_output_len.png"}  # x axis -> file, when swept


def memory_note(device_type: str) -> str:
    """What 'peak memory' means on this kind of device."""
    if device_type == "cuda":
        return (
            "CUDA max_memory_allocated after a reset (max_memory_reserved in summary.csv), above weights = "
            "minus what was allocated after loading"
        )
    return (
        "the process's peak resident memory (VmHWM, reset before each generate call), above weights = minus "
        "the resident memory after loading (weights + Python + PyTorch)"
    )


# ---- markdown ------------------------------------------------------------------------------------------------
def _cell(s: pd.DataFrame, kv: str, b: int, fmt) -> str:
    row = s[(s.kv_cache == kv) & (s.batch_size == b)]
    if row.empty:
        return "–"
    row = row.iloc[0]
    if row.status != "ok":
        return f"× ({row.status})"  # OOM, timeout or error: the CSV's message says more
    return fmt(row)


def _runtime(r) -> str:
    spread = f" ({r.wall_min_s:.2f}–{r.wall_max_s:.2f})" if r.repeats > 1 else ""
    return f"{r.wall_s:.2f}{spread}"


METRICS = [
    ("peak memory (MiB)", lambda r: f"{r.peak_mib:,.0f}"),
    ("peak above weights (MiB)", lambda r: f"{r.peak_above_weights_mib:,.0f}"),
    ("runtime (s)", _runtime),
    ("tokens/s", lambda r: f"{r.tokens_per_s:,.1f}"),
]


def table1(s: pd.DataFrame) -> list[str]:
    """Rows: with / without KV cache × peak memory, runtime, tokens/s; columns: batch sizes."""
    batches = sorted(s.batch_size.unique())
    lines = ["| KV cache | | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|---|" + "---:|" * len(batches)]
    for kv in [k for k in ("on", "off") if k in set(s.kv_cache)]:
        for i, (name, fmt) in enumerate(METRICS):
            head = f"**{'with' if kv == 'on' else 'without'} KV cache**" if i == 0 else ""
            lines.append(f"| {head} | {name} | " + " | ".join(_cell(s, kv, b, fmt) for b in batches) + " |")
    if {"on", "off"} <= set(s.kv_cache):
        lines.append(
            "| | **runtime without ÷ with cache** | "
            + " | ".join(_ratio(s, s, "off", "on", b, "wall_s") for b in batches)
            + " |"
        )
        lines.append(
            "| | same tokens with and without cache | "
            + " | ".join(_same(s, s, "on", "off", b) for b in batches)
            + " |"
        )
    return lines


def _get(s, kv, b):
    row = s[(s.kv_cache == kv) & (s.batch_size == b) & (s.status == "ok")]
    return None if row.empty else row.iloc[0]


def _ratio(num, den, kv_num, kv_den, b, col) -> str:
    n, d = _get(num, kv_num, b), _get(den, kv_den, b)
    return "–" if n is None or d is None else f"{n[col] / d[col]:.2f}×"


def _same(a, b_, kv_a, kv_b, b) -> str:
    x, y = _get(a, kv_a, b), _get(b_, kv_b, b)
    return "–" if x is None or y is None else ("yes" if x.tokens_sha == y.tokens_sha else "no")


def comparison(ours: pd.DataFrame, hf: pd.DataFrame) -> list[str]:
    """Hugging Face ÷ ours per cache mode and batch size (above 1: ours is faster / smaller)."""
    batches = sorted(set(ours.batch_size) | set(hf.batch_size))
    lines = [
        "| KV cache | HF ÷ ours | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|---|" + "---:|" * len(batches),
    ]
    for kv in [k for k in ("on", "off") if k in set(ours.kv_cache)]:
        label = f"**{'with' if kv == 'on' else 'without'} KV cache**"
        for i, (name, col) in enumerate(
            [("runtime", "wall_s"), ("peak memory", "peak_mib"), ("peak above weights", "peak_above_weights_mib")]
        ):
            cells = " | ".join(_ratio(hf, ours, kv, kv, b, col) for b in batches)
            lines.append(f"| {label if i == 0 else ''} | {name} | {cells} |")
        lines.append("| | same tokens as ours | " + " | ".join(_same(ours, hf, kv, kv, b) for b in batches) + " |")
    return lines


def details(s: pd.DataFrame) -> list[str]:
    cols = [
        "stack",
        "quantize",
        "decode",
        "kv_cache",
        "batch_size",
        "input_len",
        "output_len",
        "status",
        "prefill_s",
        "decode_s",
        "ms_per_token",
        "decode_tokens_per_s",
        "weights_mib",
        "kv_cache_bytes",
        "peak_reserved_mib",
        "tokens_sha",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in s.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if v is None or (isinstance(v, float) and pd.isna(v)):
                cells.append("")
            elif c == "kv_cache_bytes":
                cells.append(f"{int(v):,}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if c in ("prefill_s", "decode_s") else f"{v:,.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(summary: pd.DataFrame, level: str = "##") -> list[str]:
    """Table 1 for each prompt and output length and each stack (and weight format of ours), then Hugging Face ÷
    ours (each weight format) where both ran."""
    lines = []
    for (i, o), s in summary.groupby(["input_len", "output_len"], sort=False):
        for variant, se in s.groupby(VARIANT, sort=False):
            lines += [f"{level} {stack_name(*variant)}: prompt {i} tokens, {o} new tokens", ""]
            lines += table1(se) + [""]
        hf = s[s["stack"] == "hf"]
        for variant, ours in s[s["stack"] == "ours"].groupby(VARIANT, sort=False) if len(hf) else ():
            lines += [f"{level} Hugging Face ÷ {stack_name(*variant)}: prompt {i} tokens, {o} new tokens", ""]
            lines += comparison(ours, hf) + [""]
    return lines


def by_output_len(summary: pd.DataFrame) -> list[str]:
    """Runtime and time per output token against the number of new tokens, one table per stack, prompt length and
    batch size swept over 3+ output lengths (vs_output_len.png draws the same; report.md shows it as Table 1s)."""
    lines = []
    for (stack, quant, decode, i, b), s in summary.groupby([*VARIANT, "input_len", "batch_size"], sort=False):
        lengths = sorted(s.output_len.unique())
        if len(lengths) < 3:
            continue
        lines += [
            f"{stack_name(stack, quant, decode)}, prompt {i} tokens, batch {b}:",
            "",
            "| KV cache | | " + " | ".join(f"{n} new" for n in lengths) + " |",
            "|---|---|" + "---:|" * len(lengths),
        ]
        for kv in [k for k in ("on", "off") if k in set(s.kv_cache)]:
            for j, (name, fmt) in enumerate(
                (("runtime (s)", _runtime), ("ms per token", lambda r: f"{r.ms_per_token:,.1f}"))
            ):
                cells = [_cell(s[s.output_len == n], kv, b, fmt) for n in lengths]
                head = f"**{'with' if kv == 'on' else 'without'} KV cache**" if j == 0 else ""
                lines.append(f"| {head} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def quality_table(q: pd.DataFrame) -> list[str]:
    """Perplexity on data/heldout.txt and greedy agreement with the unquantized model, one row per weight format."""
    lines = [
        "| weights | perplexity | vs unquantized | greedy tokens identical to unquantized (mean of prompts) "
        "| prompts identical throughout |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in q.itertuples():
        if r.status != "ok":
            lines.append(f"| {r.quantize} | {r.status} | | | |")
            continue
        change = "reference" if r.quantize == "none" else f"{100 * r.perplexity_change:+.2f}%"
        lines.append(
            f"| {r.quantize} | {r.perplexity:.3f} | {change} | {r.same_prefix_tokens:.1f} of {GREEDY_TOKENS} "
            f"| {int(r.identical_prompts)} of {int(r.prompts)} |"
        )
    return lines


def steal_note(summary: pd.DataFrame) -> list[str]:
    """The CPU time a hypervisor took for other guests while the configurations ran (virtual machines only)."""
    if "cpu_steal" not in summary or summary.cpu_steal.isna().all():
        return []
    return [
        f"- CPU steal (time the hypervisor gave other guests) while a configuration ran: "
        f"{100 * summary.cpu_steal.min():.0f}–{100 * summary.cpu_steal.max():.0f}% (per configuration in summary.csv); "
        "timings taken under steal are slower than this machine's own speed"
    ]


def rounds_note(summary: pd.DataFrame) -> list[str]:
    """With --rounds: how far apart one configuration's decode rates lie from round to round, the run's own noise."""
    if "round_spread" not in summary or summary.round_spread.isna().all():
        return []
    worst = summary.loc[summary.round_spread.idxmax()]
    return [
        f"- rounds: a configuration's median decode tokens/s differed between rounds by "
        f"{summary.round_spread.min():.2f}–{summary.round_spread.max():.2f}× (median "
        f"{summary.round_spread.median():.2f}×; largest: {stack_name(worst['stack'], worst.quantize, worst.decode)}, "
        f"batch {worst.batch_size}; per configuration in summary.csv, `round_spread`): differences between rows "
        "smaller than that are not established by this run"
    ]


def read_rate(machine: dict) -> float:
    """The fastest read rate machine_limits.py measured (GB/s): memory's, or a kernel's reading weights where a
    single measurement taken under CPU steal left memory's below it. 0 where it measured none."""
    return max([machine.get("memory_read_GB_per_s") or 0, *machine.get("weight_read_GB_per_s", {}).values()])


def limits_section(machine: dict, summary: pd.DataFrame, model: str) -> list[str]:
    """The machine's limits as measured by machine_limits.py and, on the Llama 3.2-1B shape, batch-1 decode
    with the cache as a share of the limit for its weight bytes (fp32 counts 4 bytes, bf16/fp16 2, int8 1, int4
    0.5: the limit scales from the tool's bf16 figure)."""
    lines = ["| measured | value |", "|---|---|"]
    for key, value in machine.items():
        if isinstance(value, dict):
            lines += [f"| {key}: {k} | {v} |" for k, v in value.items()]
        else:
            lines.append(f"| {key} | {value} |")
    bound = machine.get("llama3.2-1b_limits", {}).get("decode_tok_per_s_batch1_bf16")
    # The tool derives that bound from its memory read rate: scale it to the fastest rate seen.
    rate = read_rate(machine)
    if bound and machine.get("memory_read_GB_per_s"):
        bound *= rate / machine["memory_read_GB_per_s"]
    rows = summary[(summary["stack"] == "ours") & (summary.batch_size == 1) & (summary.kv_cache == "on")]
    rows = rows[rows.status == "ok"]
    if bound and model.startswith("llama3.2-1b") and len(rows):
        if machine.get("memory_read_GB_per_s"):
            lines += ["", f"Physical limit: the weights' bytes read once per token at the fastest read rate measured "
                          f"above ({rate} GB/s)."]  # fmt: skip
        lines += [
            "",
            "| ours, batch 1, cache on | decode tokens/s | physical limit for these weights | share |",
            "|---|---:|---:|---:|",
        ]
        for r in rows.itertuples():
            if pd.notna(getattr(r, "read_mib", None)):  # the bytes this configuration's decode step reads
                limit = rate * 1e9 / (r.read_mib * 2**20)
            else:  # files from before read_mib: every weight in the blocks' format
                per_weight = {"none": BYTES.get(r.dtype, 2), "int8": 1, "w8a8": 1}.get(r.quantize, 0.5)
                limit = bound * 2 / per_weight
            compiled = f", {r.decode}" if getattr(r, "decode", "eager") != "eager" else ""
            lines.append(
                f"| {r.quantize} ({r.dtype}{compiled}) | {r.decode_tokens_per_s:.1f} | {limit:.1f} | "
                f"{100 * r.decode_tokens_per_s / limit:.0f}% |"
            )
    return lines


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def speed_table(summary: pd.DataFrame) -> list[str]:
    """Prefill time and decode rate of every engine and variant, and ours against Hugging Face and against
    llama.cpp on the same kind of weights (above 1: ours is faster)."""
    s = summary[(summary.kv_cache == "on") & (summary.status == "ok")]
    lines = [
        "| prompt, new | batch | engine | prefill (s) | decode tokens/s | decode ÷ HF | HF prefill ÷ this | "
        "decode ÷ llama.cpp (same kind of weights) | same tokens as HF |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for (i, o, b), g in s.groupby(["input_len", "output_len", "batch_size"], sort=True):
        hf = g[g["stack"] == "hf"]
        hf = hf.iloc[0] if len(hf) else None
        for r in g.itertuples():
            cpp = g[(g["stack"] == "llamacpp") & (g.quantize == r.quantize)]
            cpp = cpp.iloc[0] if len(cpp) and r.stack != "llamacpp" else None
            cells = [
                f"{i}, {o}",
                str(b),
                stack_name(r.stack, r.quantize, r.decode),
                f"{r.prefill_s:.3f}",
                f"{r.decode_tokens_per_s:,.1f}",
                f"{r.decode_tokens_per_s / hf.decode_tokens_per_s:.2f}×" if hf is not None else "–",
                f"{hf.prefill_s / r.prefill_s:.2f}×" if hf is not None else "–",
                f"{r.decode_tokens_per_s / cpp.decode_tokens_per_s:.2f}×" if cpp is not None else "–",
                ("yes" if r.tokens_sha == hf.tokens_sha else "no") if hf is not None else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [
        "",
        "Decode tokens/s: batch × (new tokens − 1) ÷ the decode time (every token after the first); prefill: the "
        "prompt's forward pass until the first token. llama.cpp runs its GGUF counterpart of each of our weight "
        "formats (unquantized in the run's dtype, Q8_0 for int8 and w8a8, Q4_1 for int4: a scale and a minimum "
        "per 32 weights, the scheme of our int4-g32, with the output projection at Q8_0 as ours at int8), batch 1, "
        "its default f16 KV cache. Quantized formats and other kernels round differently, so *same tokens* is "
        "expected only of unquantized fp32 rows.",
    ]


def compile_note(summary: pd.DataFrame) -> list[str]:
    """How long torch.compile took, where a configuration decoded with the compiled step."""
    took = summary.compile_s.dropna() if "compile_s" in summary else []
    if not len(took):
        return []
    return [
        f"- compiled decode: `torch.compile` of the static-shape decode step (llama.model.Transformer.step), done once "
        f"per configuration by a first generate call that is not timed; it took {took.min():.0f}–{took.max():.0f} s "
        "(the inductor cache on disk makes later runs faster)"
    ]


def report(
    summary: pd.DataFrame,
    meta: dict,
    plots: list[str],
    quality: pd.DataFrame | None = None,
    machine: dict | None = None,
) -> str:
    lines = [
        f"# Inference benchmark: {meta['model']}",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (commit {meta['commit']}).",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads; dtype {meta['dtype']}"
        + (f"; fp32 matmuls through {meta['cpu_fp32_matmul']}" if meta.get("cpu_fp32_matmul") else ""),
        f"- torch {meta['torch_version']}"
        + (f", transformers {meta['transformers_version']}" if meta.get("transformers_version") else "")
        + (f", llama-cpp-python {meta['llama_cpp_version']}" if meta.get("llama_cpp_version") else ""),
        f"- greedy decoding, exactly `output_len` new tokens per row (no stop at EOS); every row of a batch is the "
        f"same prompt of exactly `input_len` tokens; each configuration in a fresh process; "
        f"{meta['warmup']} warm-up run(s) of 2 new tokens, then the median of {meta['repeats']} (min–max in brackets)"
        + (
            f"; the whole sweep ran {meta['rounds']} times, one round after the other, and each figure is the median "
            f"over the {meta['rounds']} × {meta['repeats']} runs (a slow spell of the machine then hits every "
            "configuration in one round, not one configuration in all)"
            if meta.get("rounds", 1) > 1
            else ""
        ),
        f"- peak memory: {meta['memory_note']}",
        *steal_note(summary),
        *rounds_note(summary),
        *compile_note(summary),
        "",
    ]
    if machine is not None:
        lines += ["## This machine's limits (`../shared/tools/machine_limits.py --json`, machine_limits.json)", ""]
        lines += limits_section(machine, summary.assign(dtype=meta["dtype"]), meta["model"]) + [""]
    if summary["stack"].nunique() > 1 or ("decode" in summary and summary.decode.nunique() > 1):
        lines += ["## Prefill and decode side by side (KV cache on)", "", *speed_table(summary), ""]
    lines += tables(summary)
    if quality is not None:
        lines += [
            "## What each weight format costs in quality",
            "",
            f"Perplexity of `data/heldout.txt` ({int(quality.tokens.max())} tokens, {quality.dtype.iloc[0]}) and "
            f"greedy continuations of {GREEDY_TOKENS} tokens for {len(PROMPTS)} fixed chat prompts, each format "
            "in a fresh process (`project/bench/inference/quality.py`; `quality.csv`).",
            "",
            *quality_table(quality),
            "",
        ]
    lines += ["## Every configuration (medians)", ""] + details(summary) + [""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "Columns are explained in the README's section *Inference benchmark (benchmark_inference.py)*; "
        "every repeat is in `results.csv`.",
        "",
    ]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------
def plots(summary: pd.DataFrame, out: Path) -> list[str]:
    """Runtime and peak memory versus batch size (when several) and versus output length (when several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary[summary.status == "ok"]
    made = []
    for x, other in (("batch_size", "output_len"), ("output_len", "batch_size")):
        name = PLOTS[x]
        if s[x].nunique() < 2:
            continue
        panels = [("wall_s", "runtime (s)"), ("peak_mib", "peak memory (MiB)")]
        if x == "output_len":
            panels.append(("ms_per_token", "time per output token (ms)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
        for ax, (col, label) in zip(axes, panels):
            for (stack, quant, decode, kv, i, o_val), g in s.groupby([*VARIANT, "kv_cache", "input_len", other]):
                g = g.sort_values(x)
                style = "-" if kv == "on" else "--"
                ax.plot(
                    g[x],
                    g[col],
                    style,
                    marker="o" if stack == "ours" else "s",
                    label=f"{stack_name(stack, quant, decode)}, cache {kv}, {other.replace('_', ' ')} {o_val}, "
                    f"prompt {i}",
                )
            ax.set_xlabel(x.replace("_", " "))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        atomic_write(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        made.append(name)
    return made
