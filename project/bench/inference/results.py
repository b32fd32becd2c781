"""From child results to measurement files: results.csv (one row per configuration and repeat) and
summary.csv (one row per configuration: medians and spread). report.py renders them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llama.checkpoint import atomic_write
from project.bench.inference.config import Spec
from project.bench.inference.prompt import tokens_sha

MiB = 1 << 20
KEYS = ["stack", "quantize", "decode", "kv_cache", "batch_size", "input_len", "output_len"]
CSV_COLUMNS = KEYS + [
    "round",
    "repeat",
    "status",
    "wall_s",
    "prefill_s",
    "decode_s",
    "ms_per_token",
    "tokens_per_s",
    "decode_tokens_per_s",
    "peak_mib",
    "peak_above_weights_mib",
    "peak_reserved_mib",
    "weights_mib",
    "read_mib",
    "baseline_mib",
    "kv_cache_bytes",
    "compile_s",
    "n_generated",
    "tokens_sha",
    "prompt_sha",
    "peak_reset",
    "cpu_steal",
    "model",
    "device",
    "device_name",
    "dtype",
    "threads",
    "torch_version",
    "transformers_version",
    "quantization",
    "commit",
    "message",
]


def rows(done: list[tuple[Spec, dict]], meta: dict) -> list[dict]:
    """One row per measured repeat; a configuration that failed (OOM, error) gets one row with its status. A spec
    met again in done is its next round (--rounds), numbered from 0."""
    out, rounds = [], {}
    for spec, res in done:
        rounds[id(spec)] = rounds.get(id(spec), -1) + 1
        base = {
            "round": rounds[id(spec)],
            "stack": spec.stack,
            "quantize": spec.quant.name,
            "decode": spec.decode,
            "quantization": res.get("quantization", ""),
            "kv_cache": "on" if spec.kv_cache else "off",
            "batch_size": spec.batch_size,
            "input_len": spec.input_len,
            "output_len": spec.output_len,
            "status": res["status"],
            "prompt_sha": tokens_sha([res["prompt"]]) if res.get("prompt") else "",
            "weights_mib": res["weights_bytes"] / MiB if "weights_bytes" in res else None,
            "read_mib": res["read_bytes"] / MiB if "read_bytes" in res else None,  # ours: a decode step's weights
            "baseline_mib": res["baseline_bytes"] / MiB if "baseline_bytes" in res else None,
            "device_name": res.get("device_name", meta.get("device_name", "")),
            "transformers_version": res.get("transformers_version", "") if spec.stack == "hf" else "",
            "message": res.get("message", ""),
            "cpu_steal": res.get("cpu_steal"),
            "compile_s": res.get("compile_s"),
            **{k: meta[k] for k in ("model", "device", "dtype", "threads", "torch_version", "commit")},
        }
        if res["status"] != "ok":
            out.append(base)
            continue
        for r in res["runs"]:
            n_tok = spec.batch_size * spec.output_len
            decode_tokens = spec.batch_size * (spec.output_len - 1)
            out.append(
                {
                    **base,
                    "repeat": r["repeat"],
                    "wall_s": r["wall_s"],
                    "prefill_s": r["prefill_s"],
                    "decode_s": r["decode_s"],
                    "ms_per_token": 1000 * r["wall_s"] / spec.output_len,
                    "tokens_per_s": n_tok / r["wall_s"],
                    "decode_tokens_per_s": decode_tokens / r["decode_s"]
                    if decode_tokens and r["decode_s"] > 0
                    else None,
                    "peak_mib": r["peak_bytes"] / MiB,
                    "peak_above_weights_mib": (r["peak_bytes"] - res["baseline_bytes"]) / MiB,
                    "peak_reserved_mib": r["peak_reserved_bytes"] / MiB if r["peak_reserved_bytes"] else None,
                    "kv_cache_bytes": r["kv_cache_bytes"],
                    "n_generated": r["n_generated"],
                    "tokens_sha": r["tokens_sha"],
                    "peak_reset": r["peak_reset"],
                }
            )
    return out


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: status, median of every measure, min/max of the wall time, and the
    tokens' fingerprint (the same in every repeat of a configuration, else 'varies')."""
    numeric = [
        "wall_s",
        "prefill_s",
        "decode_s",
        "ms_per_token",
        "tokens_per_s",
        "decode_tokens_per_s",
        "peak_mib",
        "peak_above_weights_mib",
        "peak_reserved_mib",
        "weights_mib",
        "read_mib",
        "kv_cache_bytes",
        "compile_s",
    ]
    out = []
    if "decode" not in df:  # files from before compiled decoding
        df = df.assign(decode="eager")
    for key, g in df.groupby(KEYS, sort=False):
        # Failed in any round: the configuration shows that status (an OOM is an OOM, not a noisy repeat).
        failed = g.loc[g["status"] != "ok", "status"]
        status = failed.iloc[0] if len(failed) else "ok"
        row = dict(zip(KEYS, key), status=status, repeats=int(g["repeat"].notna().sum()))
        ok = g[g["status"] == "ok"]
        for c in numeric:
            row[c] = pd.to_numeric(ok[c]).median() if len(ok) and c in ok else None
        if "cpu_steal" in g:  # one value per configuration (the child process), absent in older files
            row["cpu_steal"] = pd.to_numeric(g["cpu_steal"]).max()
        if "round" in ok and ok["round"].nunique() > 1:  # --rounds: how far the rounds' medians lie apart
            per_round = pd.to_numeric(ok["decode_tokens_per_s"]).groupby(ok["round"]).median()
            row["round_spread"] = per_round.max() / per_round.min() if per_round.min() > 0 else None
        row["wall_min_s"] = ok["wall_s"].min() if len(ok) else None
        row["wall_max_s"] = ok["wall_s"].max() if len(ok) else None
        shas = set(ok["tokens_sha"])
        row["tokens_sha"] = shas.pop() if len(shas) == 1 else ("varies" if shas else "")
        out.append(row)
    return pd.DataFrame(out)


def write_csv(df: pd.DataFrame, path: Path):
    atomic_write(path, df.to_csv(index=False))
