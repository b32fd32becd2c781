"""Phase 2: the KV cache — what the switch changes in the code, sample outputs, Table 1 and its reading."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llama.checkpoint import REPO_ROOT, atomic_write

from . import facts, md
from .inputs import INFERENCE, load_results, read_json

SAMPLE_PROMPTS = ["What is the capital of France?", "Name three primary colours."]
SAMPLE_TOKENS = 32
GROUP_KEYS = ["model", "device", "dtype", "input_len", "output_len"]


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
    path = folder / INFERENCE["samples"]
    if mode == "run" or (mode == "auto" and not path.exists()):
        data = make_samples(path)
    elif path.exists():
        data = read_json(path)
    else:
        return md.missing("sample outputs", f"`{md.shown_path(path)}` does not exist", "python -m project.reports --samples=run")
    out = [
        f"{data.get('model', 'model not recorded')}, {data.get('decoding', 'greedy')} decoding, "
        f"{data.get('max_gen_len', '?')} new tokens at most, device {data.get('device', '?')}, dtype "
        f"{data.get('dtype', '?')}, torch {data.get('torch', '?')}, commit {data.get('commit', '?')} "
        f"(`{data.get('command', 'command not recorded')}`). The same prompt tokens go through both paths:"
    ]
    for i, s in enumerate(data.get("samples", []), 1):
        same = s.get("same_tokens")
        verdict = "identical tokens" if same else "the token ids differ" if same is not None else "not compared"
        a, b = s.get("with_cache_tokens"), s.get("without_cache_tokens")
        if same is False and a and b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            verdict += (f" from new token {first + 1} on (the first {first} agree); bf16 rounding at a near-tie "
                        f"would explain it (see above), not examined further here")
        out.append(f"\n**Prompt {i}:** {s['prompt']}\n")
        out.append(f"- *with the cache*: {s['with_cache']!r}")
        out.append(f"- *without the cache*: {s['without_cache']!r}")
        out.append(f"- {verdict}")
    return "\n".join(out)


# ---- the code --------------------------------------------------------------------------------------
def excerpt(path: str, first: int, n: int) -> str:
    lines = (REPO_ROOT / path).read_text().splitlines()[first - 1 : first - 1 + n]
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines)


def code_section(warnings: list) -> str:
    def at(path, text):
        line = facts.find_line(path, text)
        if line is None:
            warnings.append(f"`{text}` not found in {path}")
        return line

    decode = at("llama/generation.py", "logits = model(tokens[:, cur - 1 : cur]")
    setup = at("llama/generation.py", "model.setup_cache(B, total)")
    update = at("llama/model.py", "k, v = self.cache.update(start_pos, k, v)")
    link = facts.link
    parts = [
        f"The switch is `use_kv_cache` of {link('llama/generation.py', 'Llama.generate', warnings=warnings)} "
        "(`--use_kv_cache` of `inference.py`, `--kv on/off` of `benchmark_inference.py`). It changes three things:",
        "",
        f"1. **Allocation.** With the cache on, generation first calls "
        f"{link('llama/model.py', 'Transformer.setup_cache', warnings=warnings)}"
        + (f" ([`generation.py#L{setup}`](../llama/generation.py#L{setup}))" if setup else "")
        + ", which gives every layer's attention a "
        f"{link('llama/model.py', 'KVCache', warnings=warnings)}: two buffers of shape (B, n_kv_heads, "
        "prompt + new tokens, head_dim) in the weights' dtype, allocated once. Its size, "
        "2 × layers × B × n_kv_heads × length × head_dim × bytes per element, is the `kv_cache_bytes` column.",
        f"2. **Attention.** In {link('llama/model.py', 'Attention.forward', warnings=warnings)} the new tokens' keys "
        "and values are written into the buffers at their positions, and attention reads back every key so far"
        + (f" ([`model.py#L{update}`](../llama/model.py#L{update}))" if update else "")
        + ":",
    ]
    if update:
        parts += ["", "```python", excerpt("llama/model.py", update - 1, 2), "```", ""]
    parts += [
        f"   Without the cache `self.cache` is None, the keys and values come only from the tokens passed in, "
        f"and the model refuses a `start_pos` > 0 ({link('llama/model.py', 'Transformer.forward', warnings=warnings)}).",
        "3. **The decode loop.** After the prompt (prefill, identical in both modes), each step feeds the model "
        "either the one newest token at its position, or the whole sequence so far from position 0"
        + (f" ([`generation.py#L{decode}`](../llama/generation.py#L{decode}))" if decode else "")
        + ":",
    ]
    if decode:
        parts += ["", "```python", excerpt("llama/generation.py", decode - 1, 4), "```", ""]
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


# ---- Table 1 ---------------------------------------------------------------------------------------
def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: medians over the ok repeats; ok False when no repeat succeeded."""
    frame = frame.copy()
    frame["kv"] = frame["kv"].map(lambda v: str(v).strip().lower() in ("on", "true", "1", "yes"))
    frame["ok"] = frame["status"].astype(str).str.strip().str.lower() == "ok"
    keys = [k for k in GROUP_KEYS + ["runner"] if k in frame.columns] + ["batch_size", "kv"]
    metrics = [c for c in ("wall_s", "prefill_s", "decode_s", "tokens_per_s", "peak_mib", "peak_above_weights_mib",
                           "kv_cache_bytes") if c in frame.columns]  # fmt: skip
    rows = []
    for key, g in frame.groupby(keys, dropna=False, sort=True):
        ok = g[g["ok"]]
        row = dict(zip(keys, key))
        row["ok"] = not ok.empty
        row["status"] = "ok" if row["ok"] else "/".join(sorted(set(g["status"].astype(str))))
        row["repeats"] = len(ok)
        for m in metrics:
            row[m] = ok[m].astype(float).median() if not ok.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(row, metric: str, digits: int) -> str:
    if row is None:
        return "n/a"
    if not row["ok"]:
        return md.OOM
    return md.num(row.get(metric), digits)


def table1(conf: pd.DataFrame) -> str:
    batches = sorted(conf["batch_size"].unique())
    lookup = {(r["batch_size"], r["kv"]): r for _, r in conf.iterrows()}
    rows = []
    for kv, label in ((True, "With KV cache"), (False, "Without KV cache")):
        for metric, name, digits in (
            ("peak_mib", "peak memory (MiB)", 0),
            ("peak_above_weights_mib", "peak above weights (MiB)", 0),
            ("wall_s", "runtime (s)", 2),
            ("tokens_per_s", "tokens/s", 1),
        ):
            if metric in conf.columns:
                rows.append([f"{label}: {name}"] + [_cell(lookup.get((b, kv)), metric, digits) for b in batches])
        if kv and "kv_cache_bytes" in conf.columns:
            rows.append(
                ["With KV cache: cache size (MiB)"]
                + [md.num(md.mib(lookup[(b, True)]["kv_cache_bytes"]), 1) if (b, True) in lookup and lookup[(b, True)]["ok"]
                   else "n/a" for b in batches]  # fmt: skip
            )
    return md.table(["Batch size"] + [str(int(b)) for b in batches], rows)


def reading(conf: pd.DataFrame) -> str:
    """Sentences computed from the aggregated numbers."""
    lookup = {(r["batch_size"], r["kv"]): r for _, r in conf.iterrows()}
    batches = sorted(conf["batch_size"].unique())
    both = [b for b in batches if (b, True) in lookup and (b, False) in lookup and lookup[(b, True)]["ok"] and lookup[(b, False)]["ok"]]
    out = []
    if both:
        slow = [
            f"batch {int(b)}: {md.num(lookup[(b, False)]['wall_s'])} s instead of {md.num(lookup[(b, True)]['wall_s'])} s "
            f"({md.ratio(lookup[(b, False)]['wall_s'] / lookup[(b, True)]['wall_s'])} slower)"
            for b in both
        ]
        out.append("- **Runtime.** Without the cache every run is slower — " + "; ".join(slow) + ".")
        first, last = both[0], both[-1]
        if last != first:
            r_on = lookup[(last, True)]["wall_s"] / lookup[(first, True)]["wall_s"]
            r_off = lookup[(last, False)]["wall_s"] / lookup[(first, False)]["wall_s"]
            out.append(
                f"- **Batching.** Going from batch {int(first)} to batch {int(last)} ({md.ratio(last / first)} the "
                f"sequences) multiplies the runtime by {md.ratio(r_on)} with the cache and by {md.ratio(r_off)} "
                f"without it; throughput with the cache goes from {md.num(lookup[(first, True)]['tokens_per_s'], 1)} "
                f"to {md.num(lookup[(last, True)]['tokens_per_s'], 1)} tokens/s."
            )
        mem = []
        for b in both:
            on, off = lookup[(b, True)], lookup[(b, False)]
            diff = on["peak_mib"] - off["peak_mib"]
            s = f"batch {int(b)}: {md.num(on['peak_mib'], 0)} MiB with vs {md.num(off['peak_mib'], 0)} MiB without ({'+' if diff >= 0 else '−'}{md.num(abs(diff), 0)} MiB"
            if "kv_cache_bytes" in conf.columns:
                s += f"; the cache itself holds {md.num(md.mib(on['kv_cache_bytes']), 1)} MiB"
            mem.append(s + ")")
        out.append(
            "- **Memory.** Peak memory, cache on vs off — " + "; ".join(mem) + ". The cache is memory held for the "
            "whole generation; without it, each step instead builds the full-sequence activations again, and "
            "which of the two is larger at the peak depends on batch and length."
        )
    failed = [f"batch {int(r['batch_size'])} {'with' if r['kv'] else 'without'} the cache ({r['status']})"
              for _, r in conf.iterrows() if not r["ok"]]  # fmt: skip
    if failed:
        out.append(f"- **Failures** (marked {md.OOM}): " + "; ".join(failed) + ".")
    if not out:
        out.append("- Not enough successful pairs of cache-on/cache-off runs to compare.")
    return "\n".join(out)


def length_sweep(conf: pd.DataFrame) -> str | None:
    """Runtime versus output length when the results hold such a sweep (3+ output lengths at one batch size)."""
    if "output_len" not in conf.columns:
        return None
    keys = [k for k in GROUP_KEYS + ["runner"] if k in conf.columns and k != "output_len"] + ["batch_size"]
    for key, g in conf.groupby(keys, dropna=False):
        lengths = sorted(g["output_len"].unique())
        if len(lengths) < 3:
            continue
        lookup = {(r["output_len"], r["kv"]): r for _, r in g.iterrows()}
        rows = [
            [label] + [_cell(lookup.get((n, kv)), "wall_s", 2) for n in lengths]
            for kv, label in ((True, "With KV cache: runtime (s)"), (False, "Without KV cache: runtime (s)"))
        ]
        desc = ", ".join(f"{k} {v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,)))
        text = [f"Runtime versus the number of new tokens ({desc}):", "", md.table(["New tokens"] + [str(int(n)) for n in lengths], rows)]
        a, b = lengths[0], lengths[-1]
        if all((n, kv) in lookup and lookup[(n, kv)]["ok"] for n in (a, b) for kv in (True, False)):
            g_on = lookup[(b, True)]["wall_s"] / lookup[(a, True)]["wall_s"]
            g_off = lookup[(b, False)]["wall_s"] / lookup[(a, False)]["wall_s"]
            text += ["", f"From {int(a)} to {int(b)} new tokens ({md.ratio(b / a)} as many), the runtime grows "
                     f"{md.ratio(g_on)} with the cache and {md.ratio(g_off)} without it: the no-cache cost of step t "
                     "grows with t, so its total grows faster than linearly."]  # fmt: skip
        return "\n".join(text)
    return None


def compare_section(conf: pd.DataFrame) -> str | None:
    """Our runner against Hugging Face's (`--compare hf`) when both are in the results."""
    if "runner" not in conf.columns or conf["runner"].nunique() < 2:
        return None
    runners = sorted(conf["runner"].astype(str).unique())
    ours = "ours" if "ours" in runners else runners[0]
    keys = [k for k in GROUP_KEYS if k in conf.columns] + ["batch_size", "kv"]
    rows = []
    for key, g in conf.groupby(keys, dropna=False):
        by = {str(r["runner"]): r for _, r in g.iterrows()}
        if ours not in by:
            continue
        for other in (r for r in runners if r != ours and r in by):
            a, b = by[ours], by[other]
            ratio = md.ratio(b["wall_s"] / a["wall_s"]) if a["ok"] and b["ok"] else "n/a"
            rows.append([*(str(k) for k in key[:-1]), "on" if key[-1] else "off", _cell(a, "wall_s", 2),
                         f"{other}: {_cell(b, 'wall_s', 2)}", ratio])  # fmt: skip
    if not rows:
        return None
    headers = [*keys[:-1], "KV cache", f"{ours} runtime (s)", "other runtime (s)", "other / ours"]
    return md.table(headers, rows)


def results_section(folder: Path, reports_dir: Path, warnings: list) -> tuple[str, str]:
    """(provenance line, Table 1 section) from the results folder."""
    cfg = INFERENCE
    path, frame, failed = load_results(folder, cfg, "Table 1", "benchmark results", warnings)
    if failed:
        return failed
    conf = aggregate(frame)
    rel = md.shown_path(path)
    commands = md.distinct(frame, "command") if "command" in frame.columns else cfg["command"]
    prov = (
        f"benchmark results `{rel}` ({len(frame)} rows): device {md.distinct(frame, 'device')}, dtype "
        f"{md.distinct(frame, 'dtype')}, torch {md.distinct(frame, 'torch')}, benchmark commit "
        f"{md.distinct(frame, 'commit')}; command `{commands}`"
    )
    main = conf[conf["runner"].astype(str) == "ours"] if "runner" in conf.columns and (conf["runner"].astype(str) == "ours").any() else conf
    group_keys = [k for k in GROUP_KEYS if k in main.columns]
    groups = [(k, g) for k, g in main.groupby(group_keys, dropna=False)] if group_keys else [((), main)]
    groups.sort(key=lambda kg: (-kg[1]["batch_size"].nunique(),))
    wide = [kg for kg in groups if kg[1]["batch_size"].nunique() >= 2] or groups
    out = []
    for n, (key, g) in enumerate(wide):
        key = key if isinstance(key, tuple) else (key,)
        desc = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in zip(group_keys, key))
        name = "Table 1" if n == 0 else f"Table 1{chr(ord('a') + n)}"
        n = sorted({int(x) for x in g.loc[g["ok"], "repeats"]})
        reps = (f"medians over {n[0]}–{n[-1]} repeats" if len(n) > 1 else f"medians over {n[0]} repeats") if n else "no successful run"
        out += [f"### {name}: {desc or 'all configurations'}", "", f"{reps}; {md.OOM} = out of memory or failed.", "",
                table1(g), "", "**Reading.**", "", reading(g), ""]  # fmt: skip
    sweep = length_sweep(main)
    if sweep:
        out += ["### Runtime versus output length", "", sweep, ""]
    compare = compare_section(conf)
    if compare:
        out += ["### Against Hugging Face `generate` (`--compare hf`)", "", "Same weights, prompt tokens, dtype, "
                "threads and greedy settings; ratio > 1 means the other runner is slower.", "", compare, ""]  # fmt: skip
    plots = sorted(folder.glob("*.png"))
    if plots:
        out += ["### Plots", ""]
        out += [f"![{p.stem.replace('_', ' ')}]({md.relative(p, reports_dir)})\n" for p in plots]
    return prov, "\n".join(out)


def build(reports_dir: Path, inference_dir: Path, samples: str, env: dict, warnings: list) -> str:
    prov, results = results_section(inference_dir, reports_dir, warnings)
    return "\n".join(
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
            "## Table 1: peak memory and runtime, with and without the cache",
            "",
            results,
        ]
    ).rstrip() + "\n"
