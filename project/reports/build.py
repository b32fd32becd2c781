"""Write reports/phase_{1,2,3}.md from the code and the measurement files, and render each as PDF.

The inputs are the files the project writes, in the folders below (each overridable): the inference benchmark's
results.csv, the fine-tuning runs' summary.json / train_log.jsonl / eval_log.jsonl / samples.json (the course's
setting and the recipe that learns), and the fine-tuning benchmark's measurements.csv. A missing file makes its
section say so, with the command that makes it, and adds a warning.
"""

from __future__ import annotations

from pathlib import Path

from llama.checkpoint import REPO_ROOT, atomic_write

from . import facts, pdf, phase1, phase2, phase3

INFERENCE_DIR = REPO_ROOT / "reports" / "inference"  # benchmark_inference.py --out
FINETUNE_DIR = REPO_ROOT / "reports" / "finetune"  # finetuning.py --out
RECIPE_DIR = REPO_ROOT / "reports" / "finetune_recipe"  # make finetune-recipe
BENCH_DIR = REPO_ROOT / "reports" / "finetune_benchmark"  # benchmark_finetuning.py --out


def build_all(
    reports_dir: Path = REPO_ROOT / "reports",
    inference_dir: Path | None = None,
    finetune_dir: Path | None = None,
    bench_dir: Path | None = None,
    samples: str = "auto",
    pdfs: bool = True,
    recipe_dir: Path | None = None,
) -> dict:
    """Build every phase; returns {name: (markdown path, pdf path or None)} and the warnings met on the way."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    env = facts.environment()
    warnings: list[str] = []
    texts = {
        "phase_1": phase1.build(env, warnings),
        "phase_2": phase2.build(reports_dir, Path(inference_dir or INFERENCE_DIR), samples, env, warnings),
        "phase_3": phase3.build(
            reports_dir,
            Path(finetune_dir or FINETUNE_DIR),
            Path(bench_dir or BENCH_DIR),
            env,
            warnings,
            Path(recipe_dir or RECIPE_DIR),
        ),
    }
    written = {}
    for name, text in texts.items():
        path = reports_dir / f"{name}.md"
        atomic_write(path, lambda f, t=text: f.write(t.encode()))
        written[name] = (path, pdf.write_pdf(path) if pdfs else None)
    return {"written": written, "warnings": warnings}
