"""A fine-tuning run's own report, rendered from its data: summary.json (settings and results), train_log.jsonl
(one record per optimizer step), eval_log.jsonl (held-out loss) and samples.json (outputs before and after).

The one renderer of the run's settings (settings_lines), its result (loss_stats -> result_lines), the loss plot
and the sample table: project/finetune.py writes summary.md, samples.md and loss.png with them, and the phase 3
report (phase3.py) embeds the same lines, read from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama.checkpoint import atomic_write


def loss_stats(steps: list[dict], evals: list[dict] = ()) -> dict:
    """First/last losses, the means of the first and last k steps, time and memory, from the step log;
    held-out loss and perplexity at the first and last evaluation, from the eval log."""
    k = max(1, min(5, len(steps) // 4))
    timed = steps[1:] or steps  # the first step includes one-off warm-up
    held = {}
    if evals:
        first, last = evals[0], evals[-1]
        held = {
            "heldout_first_step": first["step"],
            "heldout_last_step": last["step"],
            "heldout_loss_first": first["loss"],
            "heldout_loss_last": last["loss"],
            "heldout_ppl_first": first["perplexity"],
            "heldout_ppl_last": last["perplexity"],
            "heldout_label_tokens": last["label_tokens"],
        }
    return {
        **held,
        "steps": len(steps),
        "skipped": sum(bool(s["skipped"]) for s in steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "k": k,
        "loss_first_k": sum(s["loss"] for s in steps[:k]) / k,
        "loss_last_k": sum(s["loss"] for s in steps[-k:]) / k,
        "step_s": sum(s["step_s"] for s in timed) / len(timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["step_s"] for s in timed),
        "max_memory_bytes": max(s["memory_bytes"] for s in steps),
        # a torchrun job: what rank 0 held
        **(
            {
                "ranks": steps[-1]["ranks"],
                "param_bytes": steps[-1]["param_bytes"],
                "grad_bytes": steps[-1]["grad_bytes"],
            }
            if "ranks" in steps[-1]
            else {}
        ),
    }


def precision_text(training: dict) -> str:
    scaler = ", GradScaler" if training["precision"] == "fp16" else ""
    return f"{training['precision']} autocast, fp32 master weights{scaler}"


def settings_lines(summary: dict) -> list[str]:
    """One `- **name**: value` bullet per setting of the run (model, data, LoRA, precision, device, command...)."""
    lora = summary["lora"]
    trainable, total = summary["trainable_params"], summary["total_params"]
    data, ckpt, versions = summary["data"], summary["grad_ckpt"], summary["versions"]
    settings = {
        "model": summary["model"],
        "data": f"{data['file']} ({data['examples']} examples, {data['truncated']} truncated, "
        f"max_seq_len {data['max_seq_len']})",
        "LoRA": (
            f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, targets {', '.join(lora['targets'])}"
            if lora
            else "off (full fine-tuning)"
        ),
        "trainable": f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        "gradient checkpointing": f"{ckpt['policy']} ({ckpt['blocks']} of {ckpt['of']} blocks)",
        "precision": precision_text(summary["training"]),
        "training": ", ".join(f"{k} {v}" for k, v in summary["training"].items()),
        "device": f"{summary['device']} ({summary['device_name']}), {summary['threads']} threads",
        "allocator": summary["allocator"],
        **(
            {"CPU steal during training": f"{100 * summary['cpu_steal']:.0f}% (time the hypervisor gave other guests)"}
            if summary.get("cpu_steal") is not None
            else {}
        ),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "command": f"`{summary['command']}`",
    }
    return [f"- **{k}**: {v}" for k, v in settings.items()]


def result_lines(r: dict) -> list[str]:
    """Bullets of loss_stats' numbers: steps, first/last losses and window means, time, memory."""
    return [
        f"- optimizer steps: {r['steps']} (skipped by the GradScaler: {r['skipped']})",
        f"- loss: first step {r['loss_first']:.4f}, last step {r['loss_last']:.4f}; mean of the first {r['k']} "
        f"steps {r['loss_first_k']:.4f}, of the last {r['k']} steps {r['loss_last_k']:.4f} "
        f"({r['loss_last_k'] - r['loss_first_k']:+.4f})",
        *(
            [
                f"- held-out loss (mean over {r['heldout_label_tokens']:,} label tokens of the held-out records): "
                f"{r['heldout_loss_first']:.4f} at step {r['heldout_first_step']} → {r['heldout_loss_last']:.4f} at "
                f"step {r['heldout_last_step']} ({r['heldout_loss_last'] - r['heldout_loss_first']:+.4f}); "
                f"perplexity {r['heldout_ppl_first']:.2f} → {r['heldout_ppl_last']:.2f}"
            ]
            if "heldout_loss_first" in r
            else []
        ),
        f"- time per optimizer step (after the first): {r['step_s']:.2f} s; {r['tokens_per_s']:.0f} tokens/s",
        f"- memory in use at the end of a step (max): {r['max_memory_bytes'] / 2**30:.2f} GiB "
        "(CPU: resident set of the process; CUDA/MPS: allocated by tensors)",
        *(
            [
                f"- {r['ranks']} ranks; rank 0 held {r['param_bytes'] / 2**20:,.1f} MiB of parameters and "
                f"{r['grad_bytes'] / 2**20:,.1f} MiB of gradients (its shards under FSDP, a full replica under DDP)"
            ]
            if "ranks" in r
            else []
        ),
    ]


def summary_markdown(summary: dict) -> str:
    lines = ["# Fine-tuning run", "", *settings_lines(summary), ""]
    r = summary.get("result")
    if r:
        lines += [
            "## Result (from train_log.jsonl)",
            "",
            *result_lines(r),
            "",
            "Files: `summary.json` (this page as data), `train_log.jsonl` (every optimizer step), "
            "`eval_log.jsonl` (every held-out evaluation), `loss.png`, `samples.md` / `samples.json`.",
        ]
    return "\n".join(lines) + "\n"


def samples_markdown(samples: list[dict]) -> str:
    """Instruction | before | after, one row per fixed prompt."""

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"

    def output(r: dict, when: str) -> str:
        cut = r.get(f"{when}_stopped") is False  # older runs did not record it
        return cell(r[when]) + ("<br>*(no EOS: cut at the token limit)*" if cut else "")

    lines = ["| Instruction | Set | Before | After |", "|---|---|---|---|"]
    for r in samples:
        instruction = r["instruction"] + (f"<br>Input: {r['input']}" if r.get("input") else "")
        lines.append(f"| {cell(instruction)} | {r.get('set', '')} | {output(r, 'before')} | {output(r, 'after')} |")
    return "\n".join(lines)


def plot_loss(steps: list[dict], path: Path, title: str, evals: list[dict] = ()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker="o", markersize=3, label="training")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="s", label="held-out")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def loss_title(summary: dict) -> str:
    t = summary["training"]
    schedule = t.get("lr_schedule", "constant")
    return f"{summary['model']}, {t['optimizer']} lr {t['lr']} ({schedule}), {t['precision']} autocast"


def write_run_report(out_dir: Path, summary: dict, steps: list[dict], samples: list[dict], evals: list[dict] = ()):
    """summary.json (with the results added), summary.md, samples.json, samples.md and loss.png in out_dir."""
    if steps:
        summary["result"] = loss_stats(steps, evals)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write(out_dir / "summary.md", summary_markdown(summary))
    atomic_write(out_dir / "samples.json", json.dumps(samples, indent=2, ensure_ascii=False))
    intro = "Alpaca prompt template (plain text), greedy decoding, at most the configured number of new tokens."
    title = "# Greedy outputs before and after fine-tuning"
    atomic_write(out_dir / "samples.md", f"{title}\n\n{intro}\n\n{samples_markdown(samples)}\n")
    plot_loss(steps, out_dir / "loss.png", loss_title(summary), evals)
