"""Runs each configuration in its own fresh subprocess and turns what it wrote into a record."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama.checkpoint import REPO_ROOT
from llama.runtime import log
from project.bench.config import Job


def run_job(job: Job, workdir: Path) -> dict:
    """Run `python -m project.bench.worker` on the job; return its result dict (status ok / OOM / error).

    A process killed by SIGKILL is counted as OOM: on CPU that is how the kernel's OOM killer ends it."""
    fd, job_path = tempfile.mkstemp(dir=workdir, suffix=".job.json")
    with os.fdopen(fd, "w") as f:
        json.dump(job.to_dict(), f)
    result_path = Path(job_path[: -len(".job.json")] + ".result.json")
    cmd = [sys.executable, "-m", "project.bench.worker", job_path, str(result_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result_path.exists():
        result = json.loads(result_path.read_text())
    elif proc.returncode == -signal.SIGKILL:
        result = {"status": "OOM", "message": "killed by SIGKILL (the kernel's out-of-memory killer)", "runs": []}
    else:
        tail = proc.stdout.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        result = {"status": "error", "message": tail[0], "runs": []}
    if result["status"] == "error":
        log(proc.stdout.rstrip())
    return result


def run_all(jobs: list[Job], workdir: Path, on_result=None) -> list[tuple[Job, dict]]:
    """Run the jobs in order, one line per configuration; on_result(done) after each (to save progress).

    Hugging Face jobs take the prompt ids of the matching run of ours, so both see the same tokens."""
    done: list[tuple[Job, dict]] = []
    prompts: dict[int, list[int]] = {}
    for i, job in enumerate(jobs, 1):
        if job.engine != "ours" and job.prompt is None:
            job.prompt = prompts.get(job.input_len)
        start = time.perf_counter()
        result = run_job(job, workdir)
        if result.get("prompt") and job.engine == "ours":
            prompts.setdefault(job.input_len, result["prompt"])
        log(f"[{i}/{len(jobs)}] {job.label()}: {summary_line(result)} ({time.perf_counter() - start:.0f}s)")
        done.append((job, result))
        if on_result is not None:
            on_result(done)
    return done


def summary_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']} ({result.get('message', '')})"
    runs = sorted(result["runs"], key=lambda r: r["wall_s"])
    mid = runs[len(runs) // 2]
    return f"{mid['wall_s']:.2f} s, peak {mid['peak_bytes'] / 2**20:.0f} MiB"
