"""python -m project.reports: regenerate reports/phase_{1,2,3}.md and their PDFs.

python -m project.reports                       # read reports/inference, reports/finetune, reports/finetune_benchmark
python -m project.reports --samples=run          # also rerun the cache on/off sample prompts on the default model
python -m project.reports --inference_dir reports/inference_output_len --pdf False
"""

from __future__ import annotations

from typing import Optional

from llama.checkpoint import REPO_ROOT
from llama.errors import UserError
from project.cli import run

from .build import build_all
from .pdf import count_pages


def main(
    reports_dir: str = str(REPO_ROOT / "reports"),
    inference_dir: Optional[str] = None,
    finetune_dir: Optional[str] = None,
    bench_dir: Optional[str] = None,
    samples: str = "auto",
    pdf: bool = True,
    recipe_dir: Optional[str] = None,
):
    """--samples auto (read the saved cache on/off samples, run the default model if none), run, or skip."""
    if samples not in ("auto", "run", "skip"):
        raise UserError(f"--samples must be auto, run or skip, not {samples!r}")
    result = build_all(reports_dir, inference_dir, finetune_dir, bench_dir, samples, pdf, recipe_dir)
    for md_path, pdf_path in result["written"].values():
        extra = f", {pdf_path} ({count_pages(pdf_path)} pages)" if pdf_path else ""
        print(f"wrote {md_path}{extra}")
    for w in result["warnings"]:
        print(f"note: {w}")


if __name__ == "__main__":
    run(main)
