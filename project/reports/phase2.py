"""Phase 2: the KV cache — what the switch changes in the code, sample outputs, Table 1 and its reading.

Table 1 is the inference benchmark's own: its results.csv (reports/inference) goes through
project.bench.inference.results.summarize, and project.bench.inference.report renders the tables (`tables`,
`by_output_len`), exactly as in the benchmark's report.md; the plots are the PNGs the benchmark wrote, linked.
This module adds the code walk-through, the cache on/off sample outputs (kv_cache_samples.json, made here) and
the "Reading." sentences, computed from the summary's columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llama.checkpoint import REPO_ROOT, atomic_write
from project.bench.inference import report, results

from . import facts, md

RESULTS = "results.csv"  # written by benchmark_inference.py into its --out folder
SAMPLES = "kv_cache_samples.json"  # written by make_samples (python -m project.reports --samples=run)
COMMAND = "python benchmark_inference.py"
QUANT_DIR = "inference_quant"  # beside the Table 1 folder
QUANT_COMMAND = (
    "python benchmark_inference.py --quantize none,int8,int4,w8a8 --compare hf --batch_sizes 1,16 --kv on "
    "--rounds 2 --limits --out reports/inference_quant"
)
# The decode path (fused projections, compiled decode) against transformers and llama.cpp: folder -> command.
DECODE_RUNS = {
    "inference_decode": "python benchmark_inference.py --quantize none,int8,int4 --compile both "
    "--compile_mode default,max-autotune-no-cudagraphs --compare hf,llamacpp --batch_sizes 1,16 --kv on --rounds 2 "
    "--limits --out reports/inference_decode",
    "inference_1b_decode": "python benchmark_inference.py --shape llama3.2-1b --quantize none,int8,int4 --compile both "
    "--compare hf,llamacpp --batch_sizes 1 --kv on --repeats 2 --limits --out reports/inference_1b_decode",
    "inference_decode_w8a8": "python benchmark_inference.py --quantize int4,w8a8 --compile on --compare hf,llamacpp "
    "--batch_sizes 1,16 --kv on --rounds 2 --limits --out reports/inference_decode_w8a8",
    "inference_decode_bf16": "python benchmark_inference.py --dtype bf16 --quantize none,int8,int4 --compile both "
    "--compare hf,llamacpp --batch_sizes 1,16 --kv on --rounds 2 --limits --out reports/inference_decode_bf16",
    "inference_decode_fp32": "python benchmark_inference.py --dtype fp32 --quantize none --compile both "
    "--compare hf,llamacpp --batch_sizes 1 --kv on --rounds 2 --limits --out reports/inference_decode_fp32",
    "inference_1b_decode_bf16": "python benchmark_inference.py --shape llama3.2-1b --dtype bf16 "
    "--quantize none,int8,int4 --compile both --compare hf,llamacpp --batch_sizes 1 --kv on --repeats 2 --limits "
    "--out reports/inference_1b_decode_bf16",
}
TABLE1_1B_DIR = "inference_1b_table1"  # the course's Table 1 on the Llama 3.2-1B shape, beside the Table 1 folder
TABLE1_1B_COMMAND = (
    "python benchmark_inference.py --shape llama3.2-1b --batch_sizes 1,8,16 --input_lens 256 --output_lens 32 "
    "--kv both --compare hf --repeats 1 --warmup 0 --timeout_s 300 --limits --out reports/inference_1b_table1"
)
# The course's own Table 1 (Llama 3.2-1B on one P100, fp16, prompt 256, 32 new tokens), quoted from its handout for
# comparison, not measured here: (kv cache, batch) -> (runtime s, peak MB).
COURSE_P100 = {
    ("on", 1): (4.54, 3230.12),
    ("on", 8): (28.41, 5755.00),
    ("on", 16): (52.42, 8641.54),
    ("off", 1): (11.61, 3230.12),
    ("off", 8): (29.16, 5755.00),
    ("off", 16): (52.46, 8641.54),
}
SAMPLE_PROMPTS = ["What is the capital of France?", "Name three primary colours."]
SAMPLE_TOKENS = 32


# ---- sample outputs -----------------------------------------------------------------------------
def make_samples(path: Path, max_gen_len: int = SAMPLE_TOKENS) -> dict:
    """Run the default model on two short chat prompts with and without the cache; save and return them."""
    from llama.generation import Llama
    from llama.runtime import DTYPE_NAMES

    llama = Llama.build()
    rows = []
    for prompt in SAMPLE_PROMPTS:
        ids = [llama.tokenizer.encode_dialog([{"role": "user", "content": prompt}])]
        row = {"prompt": prompt}
        # No timings here: these runs share the machine; Table 1 is where time is measured.
        for name, use in (("with_cache", True), ("without_cache", False)):
            out = llama.generate(ids, max_gen_len, use_kv_cache=use)
            row[name] = llama.tokenizer.decode(out.tokens[0])
            row[name + "_tokens"] = out.tokens[0]
        row["same_tokens"] = row["with_cache_tokens"] == row["without_cache_tokens"]
        rows.append(row)
    weights = llama.model.tok_embeddings.weight
    data = {
        "model": "SmolLM2-135M-Instruct (default, GGUF Q4_1)",
        "device": str(weights.device),
        "dtype": DTYPE_NAMES[weights.dtype],
        "torch": facts.environment()["torch"],
        "commit": facts.git_commit(),
        "max_gen_len": max_gen_len,
        "decoding": "greedy",
        "command": "python -m project.reports --samples=run",
        "samples": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
    return data


def samples_section(folder: Path, mode: str) -> str:
    """mode: 'auto' reads the samples file or runs the model if it is missing, 'run' always runs, 'skip' reads only."""
    path = folder / SAMPLES
    if mode == "run" or (mode == "auto" and not path.exists()):
        data = make_samples(path)
    elif path.exists():
        data = json.loads(path.read_text())
    else:
        return md.missing(
            "sample outputs", f"`{md.shown_path(path)}` does not exist", "python -m project.reports --samples=run"
        )
    out = [
        f"{data['model']}, {data['decoding']} decoding, {data['max_gen_len']} new tokens at most, device "
        f"{data['device']}, dtype {data['dtype']}, torch {data['torch']}, commit {data['commit']} "
        f"(`{data['command']}`). The same prompt tokens go through both paths:"
    ]
    for i, s in enumerate(data["samples"], 1):
        verdict = "identical tokens" if s["same_tokens"] else "the token ids differ"
        a, b = s["with_cache_tokens"], s["without_cache_tokens"]
        if not s["same_tokens"]:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            verdict += (
                f" from new token {first + 1} on (the first {first} agree); bf16 rounding at a near-tie "
                f"would explain it (see above), not examined further here"
            )
        out += [
            f"\n**Prompt {i}:** {s['prompt']}\n",
            f"- *with the cache*: {s['with_cache']!r}",
            f"- *without the cache*: {s['without_cache']!r}",
            f"- {verdict}",
        ]
    return "\n".join(out)


# ---- the code --------------------------------------------------------------------------------------
def excerpt(path: str, first: int, n: int) -> str:
    lines = (REPO_ROOT / path).read_text().splitlines()[first - 1 : first - 1 + n]
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines)


def code_section(warnings: list) -> str:
    def quote(path: str, text: str, n: int = 0) -> tuple[str, list[str]]:
        """(" ([`file#Lk`](../path#Lk))" for the line k holding text, the n lines from k - 1 as a code block);
        ("", []) and a warning when the text is no longer there."""
        line = facts.find_line(path, text)
        if line is None:
            warnings.append(f"`{text}` not found in {path}")
            return "", []
        code = ["", "```python", excerpt(path, line - 1, n), "```", ""] if n else []
        return f" ([`{Path(path).name}#L{line}`](../{path}#L{line}))", code

    def link(path, symbol):
        return facts.link(path, symbol, warnings=warnings)

    setup, _ = quote("llama/generation.py", "model.setup_cache(B, cache_len)")
    update, update_code = quote("llama/model.py", "k, v = self.cache.update(start_pos, k, v)", 2)
    decode, decode_code = quote("llama/generation.py", "return model(tokens[:, cur - 1 : cur]", 3)
    parts = [
        f"The switch is `use_kv_cache` of {link('llama/generation.py', 'Llama.generate')} "
        "(`--use_kv_cache` of `inference.py`, `--kv on/off` of `benchmark_inference.py`). It changes three things:",
        "",
        "1. **Allocation.** With the cache on, generation first calls "
        f"{link('llama/model.py', 'Transformer.setup_cache')}{setup}, which gives every layer's attention a "
        f"{link('llama/model.py', 'KVCache')}: two buffers of shape "
        "(B, n_kv_heads, prompt + new tokens, head_dim) in the weights' dtype, allocated once (with `--compile`, "
        "the length rounded up to a multiple of 256, so that one compiled step serves prompts of similar length). "
        "Its size, "
        "2 × layers × B × n_kv_heads × length × head_dim × bytes per element, is the `kv_cache_bytes` column.",
        f"2. **Attention.** In {link('llama/model.py', 'Attention.forward')} the new tokens' keys and values are "
        f"written into the buffers at their positions, and attention reads back every key so far{update}:",
        *update_code,
        f"   Without the cache `self.cache` is None, the keys and values come only from the tokens passed in, "
        f"and the model refuses a `start_pos` > 0 ({link('llama/model.py', 'Transformer.forward')}).",
        f"3. **The decode loop.** After the prompt ({link('llama/generation.py', 'prefill')}, identical in both "
        f"modes), each step ({link('llama/generation.py', 'decode_one_token')}) feeds the model either the one "
        f"newest token at its position, or the whole sequence so far from position 0{decode}:",
        *decode_code,
    ]
    parts += [
        "So with the cache, step t costs one token's worth of projections and MLP plus attention over t cached "
        "keys; without it, step t recomputes all t tokens through every layer: total work grows with the square "
        "of the length instead of linearly, in exchange for not holding the cache. Both paths compute the same "
        "function, but not with the same floating-point operations (one new row against cached keys versus the "
        "whole sequence again, with different matrix shapes and summation orders). In exact arithmetic greedy "
        "decoding would give the same tokens; in bf16 the logits differ by rounding, and where two candidate "
        "tokens are nearly tied the argmax can flip and the continuations part ways. The samples below show "
        "whether that happened."
    ]
    return "\n".join(parts)


# ---- reading Table 1 ---------------------------------------------------------------------------------
def _pairs(s: pd.DataFrame, key: str) -> tuple[dict, list]:
    """{(key value, kv_cache): summary row} of the ok rows, and the key values measured ok both with and without."""
    ok = {(getattr(r, key), r.kv_cache): r for r in s[s.status == "ok"].itertuples()}
    both = sorted({k for k, _ in ok if (k, "on") in ok and (k, "off") in ok})
    return ok, both


def reading(s: pd.DataFrame) -> list[str]:
    """Sentences from one stack's summary at one prompt and output length, across batch sizes."""
    ok, both = _pairs(s, "batch_size")
    out = []
    if both:
        slow = [
            f"batch {b}: {md.num(ok[b, 'off'].wall_s)} s instead of {md.num(ok[b, 'on'].wall_s)} s "
            f"({md.ratio(ok[b, 'off'].wall_s / ok[b, 'on'].wall_s)} slower)"
            for b in both
        ]
        out.append("- **Runtime.** Without the cache every run is slower — " + "; ".join(slow) + ".")
        first, last = both[0], both[-1]
        if last != first:
            r_on = ok[last, "on"].wall_s / ok[first, "on"].wall_s
            r_off = ok[last, "off"].wall_s / ok[first, "off"].wall_s
            out.append(
                f"- **Batching.** Going from batch {first} to batch {last} ({md.ratio(last / first)} the sequences) "
                f"multiplies the runtime by {md.ratio(r_on)} with the cache and by {md.ratio(r_off)} without it; "
                f"throughput with the cache goes from {md.num(ok[first, 'on'].tokens_per_s, 1)} to "
                f"{md.num(ok[last, 'on'].tokens_per_s, 1)} tokens/s."
            )
        mem = []
        for b in both:
            on, off = ok[b, "on"], ok[b, "off"]
            diff = on.peak_mib - off.peak_mib
            mem.append(
                f"batch {b}: {md.num(on.peak_mib, 0)} MiB with vs {md.num(off.peak_mib, 0)} MiB without "
                f"({'+' if diff >= 0 else '−'}{md.num(abs(diff), 0)} MiB; the cache itself holds "
                f"{md.num(md.mib(on.kv_cache_bytes), 1)} MiB)"
            )
        out.append(
            "- **Memory.** Peak memory, cache on vs off — " + "; ".join(mem) + ". The cache is memory held for the "
            "whole generation; without it, each step instead builds the full-sequence activations again, and "
            "which of the two is larger at the peak depends on batch and length."
        )
    failed = [
        f"batch {r.batch_size} {'with' if r.kv_cache == 'on' else 'without'} the cache ({r.status})"
        for r in s[s.status != "ok"].itertuples()
    ]
    if failed:
        out.append("- **Failures** (marked ×): " + "; ".join(failed) + ".")
    return out or ["- Not enough successful pairs of cache-on/cache-off runs to compare."]


def growth(summary: pd.DataFrame) -> list[str]:
    """How runtime grows from the shortest to the longest output, where 3+ output lengths were measured."""
    out = []
    for (stack, i, b), s in summary.groupby(["stack", "input_len", "batch_size"], sort=False):
        ok, both = _pairs(s, "output_len")
        if s.output_len.nunique() < 3 or len(both) < 2:
            continue
        a, z = both[0], both[-1]
        g_on, g_off = ok[z, "on"].wall_s / ok[a, "on"].wall_s, ok[z, "off"].wall_s / ok[a, "off"].wall_s
        out.append(
            f"- {stack}, prompt {i}, batch {b}: from {a} to {z} new tokens ({md.ratio(z / a)} as many), the "
            f"runtime grows {md.ratio(g_on)} with the cache and {md.ratio(g_off)} without it: the no-cache "
            "cost of step t grows with t, so its total grows faster than linearly."
        )
    return out


# ---- Table 1 ---------------------------------------------------------------------------------------
def read_results(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results.csv, its summary by configuration); EmptyDataError when it has no rows."""
    frame = pd.read_csv(path)
    if not len(frame):
        raise pd.errors.EmptyDataError("no rows")
    return frame, results.summarize(frame)


def results_section(folder: Path, reports_dir: Path, warnings: list) -> tuple[str, str]:
    """(provenance line, Table 1 section) from the benchmark's results.csv in folder."""
    path = folder / RESULTS
    read, failed = md.read_results(path, read_results, "Table 1", "benchmark results", COMMAND, warnings)
    if failed:
        return failed
    frame, summary = read
    made_by = folder / "report.md"
    command = (
        f"the exact command is in [`report.md`]({md.relative(made_by, reports_dir)})" if made_by.exists() else COMMAND
    )
    prov = (
        f"benchmark results `{md.shown_path(path)}` ({len(frame)} rows): {md.distinct(frame, 'model')}, device "
        f"{md.distinct(frame, 'device')} ({md.distinct(frame, 'device_name')}), dtype {md.distinct(frame, 'dtype')}, "
        f"torch {md.distinct(frame, 'torch_version')}, benchmark commit {md.distinct(frame, 'commit')}; {command}"
    )
    repeats = sorted(set(summary.loc[summary.status == "ok", "repeats"]))
    device_type = str(frame.device.iloc[0]).split(":")[0]
    out = [
        f"Medians of {'/'.join(map(str, repeats)) or 'no'} repeat{'s' if repeats != [1] else ''} (min–max of the "
        f"runtime in brackets); × (OOM) = out of memory. Peak memory: {report.memory_note(device_type)}.",
        "",
        *report.tables(summary, "###"),
    ]
    ours = summary[summary["stack"] == "ours"]
    groups = list(ours.groupby(["input_len", "output_len"], sort=False))
    # Across batch sizes; a sweep over output lengths alone is read below its own table.
    read = [(k, s) for k, s in groups if s.batch_size.nunique() > 1] or (groups if len(groups) == 1 else [])
    for (i, o), s in read:
        where = f" (prompt {i} tokens, {o} new tokens)" if len(read) > 1 else ""
        out += [f"**Reading{where}.**", "", *reading(s), ""]
    sweep = report.by_output_len(summary)
    if sweep:
        out += ["### Runtime versus output length", "", *sweep, *growth(ours), ""]
    plots = [folder / name for name in report.PLOTS.values() if (folder / name).exists()]
    if plots:
        out += ["### Plots", ""] + [f"![{p.stem.replace('_', ' ')}]({md.relative(p, reports_dir)})\n" for p in plots]
    return prov, "\n".join(out)


def optional_results(folder: Path, reports_dir: Path, what: str, command: str) -> tuple | str:
    """(results.csv, its summary, a sentence naming where it came from) for an optional benchmark folder, or, when
    it has not been measured, the plain "no results yet" text with the command that makes it (not a warning)."""
    path = folder / RESULTS
    if not path.exists():
        return md.missing(what, f"`{md.shown_path(path)}` does not exist", command)
    frame = pd.read_csv(path)
    source = (
        f"From `{md.shown_path(path)}`: {md.distinct(frame, 'model')} on {md.distinct(frame, 'device_name')}, "
        f"dtype {md.distinct(frame, 'dtype')}, benchmark commit {md.distinct(frame, 'commit')}; the command is in "
        f"[`report.md`]({md.relative(folder / 'report.md', reports_dir)})."
    )
    return frame, results.summarize(frame), source


def course_table(folder: Path, reports_dir: Path) -> str:
    """Table 1 at the course's setting on the 1B shape (its benchmark folder), beside the course's P100 figures;
    memory in MB (10^6 bytes, the course's unit) and MiB."""
    got = optional_results(folder, reports_dir, "the 1B-shape Table 1", TABLE1_1B_COMMAND)
    if isinstance(got, str):
        return got
    frame, summary, source = got
    lines = [
        f"{source} The course's figures are its own (one P100, fp16), quoted for comparison.",
        "",
        "| KV cache | Batch | Ours: runtime (s) | Ours: peak (MB) | Ours: peak (MiB) | transformers: runtime (s) | "
        "Course P100: runtime (s) | Course P100: peak (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (cache, batch), (p100_s, p100_mb) in COURSE_P100.items():
        cells = []
        for stack in ("ours", "hf"):
            match = summary[(summary["stack"] == stack) & (summary.kv_cache == cache) & (summary.batch_size == batch)
                            & (summary.quantize.fillna("none") == "none")]  # fmt: skip
            cells.append(match.iloc[0] if len(match) else None)
        ours, hf = cells

        def runtime(r):
            if r is None:
                return "—"
            return f"{r.wall_s:.2f}" if r.status == "ok" else f"× ({r.status})"

        mb = f"{ours.peak_mib * 2**20 / 1e6:.0f}" if ours is not None and ours.status == "ok" else "×"
        mib = f"{ours.peak_mib:.0f}" if ours is not None and ours.status == "ok" else "×"
        lines.append(
            f"| {cache} | {batch} | {runtime(ours)} | {mb} | {mib} | {runtime(hf)} | {p100_s:.2f} | {p100_mb:.2f} |"
        )
    # Without the cache, batch 16 runs 32 passes over the whole prefix: 2 FLOPs per parameter per token.
    flops = 2 * facts.llama_1b()["params"] * sum(16 * (256 + t) for t in range(32))
    limits = folder / "machine_limits.json"
    machine = json.loads(limits.read_text()) if limits.exists() else {}
    rate = machine.get("matmul_TFLOP_per_s", {}).get(md.distinct(frame, "dtype"))
    lines += [
        "",
        "× (timeout): the configuration did not finish within the run's `--timeout_s`. Without the cache every new "
        f"token re-runs the whole prefix: at batch 16 that is 32 forward passes over 16 × 256–287 tokens, "
        f"{flops / 1e12:.0f} TFLOP of matmuls (2 per parameter per token)"
        + (f", {flops / (rate * 1e12) / 60:.0f} minutes at this machine's measured {rate} TFLOP/s." if rate else "."),
        "",
        "What differs from the course's machine: a P100 has fp16 arithmetic in hardware (18.7 TFLOP/s by its "
        "specification) and 732 GB/s of HBM2; this machine"
        + (
            f" ({machine.get('device', 'a CPU')}, {machine.get('threads')} threads) measured "
            + " / ".join(f"{k} {v}" for k, v in machine.get("matmul_TFLOP_per_s", {}).items())
            + " TFLOP/s and a memory read rate of "
            f"{machine.get('memory_read_GB_per_s')} GB/s (`../shared/tools/machine_limits.py`)"
            if machine
            else " is a CPU"
        )
        + ", and runs the dtype it computes natively. Runtimes are therefore many times longer here; the peaks "
        "here are the process's resident memory (weights, cache, activations and the Python process itself), "
        "the course's the CUDA allocator's.",
    ]
    return "\n".join(lines)


def formats(frame: pd.DataFrame) -> str:
    """Each quantized format's load-time description (which layers, which kernel), as the results recorded it."""
    return " — ".join(sorted(set(frame.quantization.dropna().astype(str)) - {"weights not quantized", ""}))


def quant_section(folder: Path, reports_dir: Path, warnings: list) -> str:
    """Weight formats side by side (Table 1 per format, Hugging Face ÷ ours), their quality and the machine's
    limits, from the quantization benchmark's folder, rendered by the benchmark's own renderers."""
    got = optional_results(folder, reports_dir, "the weight formats", QUANT_COMMAND)
    if isinstance(got, str):
        return got
    frame, summary, source = got
    out = [
        f"{source} Weight-only int8 / int4 and w8a8 (int8 weights and per-token int8 activations; `project/quant.py`): "
        f"{formats(frame)}.",
        "",
    ]
    limits = folder / "machine_limits.json"
    if limits.exists():
        machine = json.loads(limits.read_text())
        dtype, model = md.distinct(frame, "dtype"), md.distinct(frame, "model")
        out += [
            "### This machine's limits",
            "",
            *report.limits_section(machine, summary.assign(dtype=dtype), model),
            "",
        ]
    out += report.tables(summary, "###")
    quality = folder / "quality.csv"
    if quality.exists():
        out += ["### What each weight format costs in quality", "", *report.quality_table(pd.read_csv(quality)), ""]
    return "\n".join(out)


def decode_section(folder: Path, reports_dir: Path, command: str) -> str:
    """The decode path (fused projections, the compiled static-shape step) against transformers and llama.cpp, with
    the machine's limits, from the decode benchmark's folder, rendered by the benchmark's own table."""
    got = optional_results(folder, reports_dir, "the decode path", command)
    if isinstance(got, str):
        return got
    frame, summary, source = got
    ok = summary[(summary.status == "ok") & (summary.kv_cache == "on") & (summary.batch_size == 1)]
    out = [
        f"{source} Every run of ours fuses each block's q/k/v and w1/w3 projections at load time "
        "(`llama.model.fuse_projections`); *compiled decode* runs `Transformer.step` (a tensor position, the whole "
        "fixed-size cache read under a mask, so every step has the same shapes) through `torch.compile`, once per "
        "configuration, in its default mode, and where a row names it in `max-autotune-no-cudagraphs` (inductor "
        "times the candidate kernels of every matmul and keeps the fastest; `--compile_mode`). Runs from commit "
        "cae8667 on hold, in compiled CPU configurations, a `w2` whose rows are longer than 4096 columns (the 1B "
        "shape's 8192) as contiguous blocks of 2048 (`llama.model.ColumnBlocks`), which the compiled single-row "
        "products stream faster; earlier runs multiplied the whole `w2`. Runs from commit e8f884d on compile the CPU "
        "step with its weights frozen in as constants (inductor's `freezing`; before, they were ~245 inputs handed "
        "over at every call) and compute each single row's materialized input inside the compiled code "
        "(`llama.model.lower_materialize`; before, a call to a Python kernel per product).",
        "",
        f"Weight formats as this run loaded them: {formats(frame)}.",
        "",
        *report.compile_note(summary),
        *report.steal_note(summary),
        *report.rounds_note(summary),
        "",
        *report.speed_table(summary),
        "",
    ]
    limits = folder / "machine_limits.json"
    best = ok.loc[ok.decode_tokens_per_s.idxmax()] if len(ok) else None
    if limits.exists() and best is not None:
        machine = json.loads(limits.read_text())
        rate = report.read_rate(machine)  # the physical limit, as the benchmark's own limit table takes it
        plain = ok[(ok["stack"] == "ours") & (ok.quantize == "none")]
        if rate and len(plain):
            weights_gb = plain.weights_mib.iloc[0] * 2**20 / 1e9
            fastest = plain.decode_tokens_per_s.max()
            out += [
                f"Against the hardware: the unquantized weights are {weights_gb:.2f} GB; read once per token at the "
                f"fastest read rate `../shared/tools/machine_limits.py` measured here ({rate} GB/s, "
                f"`machine_limits.json`) that allows {rate / weights_gb:.1f} tokens/s at batch 1, and our fastest "
                f"unquantized decode reaches {fastest:.1f} ({100 * fastest * weights_gb / rate:.0f} %). The fastest "
                f"batch-1 decode in this run: {report.stack_name(best['stack'], best.quantize, best.decode)}, "
                f"{best.decode_tokens_per_s:.1f} tokens/s.",
                "",
            ]
    return "\n".join(out)


def build(reports_dir: Path, inference_dir: Path, samples: str, env: dict, warnings: list) -> str:
    prov, table1 = results_section(inference_dir, reports_dir, warnings)
    return (
        "\n".join(
            [
                "# Phase 2 — Inference with and without the KV cache",
                "",
                f"*Generated by `python -m project.reports` at commit {env['commit']} (torch {env['torch']}) from the "
                f"{prov}.*",
                "",
                "## What the KV-cache switch changes in the code",
                "",
                code_section(warnings),
                "",
                "## Sample prompts, with and without the cache",
                "",
                samples_section(inference_dir, samples),
                "",
                "## Table 1 as the course defines it: Llama 3.2-1B shape, prompt 256, 32 new tokens",
                "",
                course_table(inference_dir.parent / TABLE1_1B_DIR, reports_dir),
                "",
                "## Table 1 on the default model (real weights): peak memory and runtime, with and without the cache",
                "",
                table1,
                "",
                "## Quantized weights: int8, int4 and w8a8 against the model's own dtype",
                "",
                quant_section(inference_dir.parent / QUANT_DIR, reports_dir, warnings),
                "",
                "## The decode path: fused projections and a compiled step, against transformers and llama.cpp",
                "",
                *[
                    decode_section(inference_dir.parent / folder, reports_dir, command) + "\n"
                    for folder, command in DECODE_RUNS.items()
                ],
            ]
        ).rstrip()
        + "\n"
    )
