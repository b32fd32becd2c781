"""Write reports/phase_{1,2,3}.md from the code and the latest results files, and render each as PDF."""
from __future__ import annotations

from pathlib import Path

from llama.checkpoint import REPO_ROOT, atomic_write

from . import facts, phase1, phase2, phase3, pdf
from .inputs import FINETUNE, FINETUNE_BENCH, INFERENCE


def build_all(
    reports_dir: Path = REPO_ROOT / "reports",
    inference_dir: Path | None = None,
    finetune_dir: Path | None = None,
    bench_dir: Path | None = None,
    samples: str = "auto",
    pdfs: bool = True,
) -> dict:
    """Build every phase; returns {name: (markdown path, pdf path or None)} and the warnings met on the way."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    inference_dir = Path(inference_dir or REPO_ROOT / INFERENCE["dir"])
    finetune_dir = Path(finetune_dir or REPO_ROOT / FINETUNE["dir"])
    bench_dir = Path(bench_dir or REPO_ROOT / FINETUNE_BENCH["dir"])
    env = facts.environment()
    warnings: list[str] = []
    texts = {
        "phase_1": phase1.build(env, warnings),
        "phase_2": phase2.build(reports_dir, inference_dir, samples, env, warnings),
        "phase_3": phase3.build(reports_dir, finetune_dir, bench_dir, env, warnings),
    }
    written = {}
    for name, text in texts.items():
        path = reports_dir / f"{name}.md"
        atomic_write(path, lambda f, t=text: f.write(t.encode()))
        written[name] = (path, pdf.write_pdf(path) if pdfs else None)
    return {"written": written, "warnings": warnings}
