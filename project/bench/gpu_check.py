"""`make gpu-check`: the CUDA tests, then a short Table 1, Table 3 and quantized decode (int8 / int4, the tinygemm
kernel) on this machine's GPU, into reports/gpu/.

    python -m project.bench.gpu_check              # on a CUDA machine: about 10 minutes on one modern GPU
    python -m project.bench.gpu_check --dry_run    # print the steps and check their flags; runs nothing (any machine)

The steps run in order of importance, each within its own cap and what is left of one budget (--budget_s); a
benchmark stopped at its limit keeps what it finished in its folder's .partial. Whatever cannot run (a package,
the tokenizer or the data missing, no bf16 on this GPU, no time left) is skipped, and the end says what ran and
what was skipped, and why, also in reports/gpu/gpu_check.md. The GPU machine may have no internet: what is
missing is installed with pip where an index answers, and otherwise what needs it is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llama.runtime import cuda_has_bf16

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = Path("reports/gpu")
RUNTIME = ("fire", "gguf", "numpy", "pandas", "tiktoken", "regex", "safetensors", "tqdm", "matplotlib")
DEV = ("pytest", "transformers", "peft")  # the tests, and --compare hf (transformers; peft for Table 3)
MIN_STEP_S = 60  # a step given less than this would only be stopped half-way


@dataclass
class Step:
    name: str
    cmd: list[str]  # run in the repository root
    cap_s: float  # at most this long, and never past the budget
    needs: tuple[str, ...] = ()  # keys of `missing` (see prerequisites) without which it is skipped


def plan(bf16: bool, missing: dict[str, str]) -> tuple[list[Step], list[str]]:
    """The steps, most important first, and what is left out of them (with why)."""
    py, skipped = sys.executable, []
    skipped += [f"--compare hf: {missing[m]}" for m in ("transformers", "peft") if m in missing]
    hf_inference = [] if "transformers" in missing else ["--compare", "hf"]
    hf_finetune = [] if {"transformers", "peft"} & set(missing) else ["--compare", "hf"]
    dtypes = ["bf16", "fp16"] if bf16 else ["fp16"]
    if not bf16:
        skipped.append("Table 1 in bf16: this GPU has no bf16 arithmetic (compute capability below 8.0)")

    def table1(dtype: str, cap_s: float) -> Step:
        return Step(
            f"table1_{dtype}",
            [py, "benchmark_inference.py", "--shape", "llama3.2-1b", "--device", "cuda", "--dtype", dtype,
             "--batch_sizes", "1,8,16", "--kv", "both", "--input_lens", "256", "--output_lens", "32",
             "--repeats", "2", "--warmup", "1", "--timeout_s", "60", *hf_inference,
             "--out", str(OUT / f"table1_{dtype}")],
            cap_s,
            ("tokenizer",),
        )  # fmt: skip

    table3 = Step(
        "table3",
        [py, "benchmark_finetuning.py", "--shape", "llama3.2-1b", "--device", "cuda",
         "--configs", ",".join(table3_configs()), "--examples", "2", "--timeout_s", "90", *hf_finetune,
         "--out", str(OUT / "table3"), "--run_dir", "runs/gpu/table3"],
        240,
        ("tokenizer", "data"),
    )  # fmt: skip
    quant = Step(
        "quant_decode",
        [py, "benchmark_inference.py", "--shape", "llama3.2-1b", "--device", "cuda", "--dtype", dtypes[0],
         "--quantize", "none,int8,int4", "--batch_sizes", "1,16", "--kv", "on", "--input_lens", "256",
         "--output_lens", "32", "--repeats", "2", "--warmup", "1", "--timeout_s", "60", *hf_inference,
         "--out", str(OUT / "quant_decode")],
        150,
        ("tokenizer",),
    )  # fmt: skip
    tests = Step("cuda_tests", [py, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py"], 150, ("pytest",))
    # The caps add up to more than the budget: time a step leaves unused goes to the ones after it, and the
    # last (Table 1 in the second dtype) runs on what is left, if at least MIN_STEP_S.
    steps = [tests, quant, table3, table1(dtypes[0], 210), *[table1(d, 180) for d in dtypes[1:]]]
    kept = []
    for step in steps:
        lacking = [missing[n] for n in step.needs if n in missing]
        if lacking:
            skipped.append(f"{step.name}: {'; '.join(lacking)}")
        else:
            kept.append(step)
    return kept, skipped


def table3_configs() -> list[str]:
    """Table 3's rows: the 8 on/off combinations of checkpointing, mixed precision and LoRA."""
    from project.bench.finetune.configs import default_sweep

    return [c.name for c in default_sweep() if c.grad_accum == 1 and c.base == "auto"]


# ---- what the steps need -----------------------------------------------------------------------------------------
def requirement(name: str) -> str:
    """name's line in requirements*.txt (e.g. fire>=0.6), so that pip installs a version the project supports."""
    for path in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO_ROOT / path).read_text().splitlines():
            spec = line.split("#")[0].strip()
            if re.split(r"[<>=!~ ;\[]", spec)[0] == name:
                return spec
    return name


def install_missing() -> dict[str, str]:
    """{package: why it is missing} for what is still missing after one try with pip."""
    lacking = [m for m in RUNTIME + DEV if importlib.util.find_spec(m) is None]
    if lacking:
        specs = [requirement(m) for m in lacking]
        print(f"installing {' '.join(specs)} ...", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--retries", "0", "--timeout", "10", *specs]
        try:
            subprocess.run(pip, timeout=300)
        except subprocess.TimeoutExpired:
            pass
        importlib.invalidate_caches()
    why = "is not installed and pip could not install it (no package index reachable?)"
    return {m: f"{m} {why}" for m in lacking if importlib.util.find_spec(m) is None}


def prerequisites() -> dict[str, str]:
    """{what: why it is missing}: packages, the Llama 3 tokenizer (every 1B run) and the records (Table 3)."""
    missing = install_missing()
    absent = [m for m in RUNTIME if m in missing]
    if absent:
        refuse(
            f"{', '.join(absent)} missing and pip could not install them: `pip install -r requirements.txt`, "
            "or carry their wheels to this machine"
        )
    from llama.checkpoint import LLAMA3_TOKENIZER
    from llama.errors import UserError
    from project.data import find_dataset

    if not LLAMA3_TOKENIZER.exists():
        subprocess.run([sys.executable, "-m", "llama.assets"], cwd=REPO_ROOT)
    if not LLAMA3_TOKENIZER.exists():
        missing["tokenizer"] = f"{LLAMA3_TOKENIZER} is missing and `python -m llama.assets` could not fetch it"
    try:
        find_dataset()  # the Alpaca records: data/, ../shared/data/, else downloaded
    except UserError as e:
        missing["data"] = str(e)
    return missing


# ---- running -----------------------------------------------------------------------------------------------------
def run_step(step: Step, limit_s: float, log_path: Path) -> str:
    """Run step.cmd with its output in log_path, in a process group of its own (so that a stop reaches the
    benchmark's children too); returns its status."""
    with open(log_path, "w") as log:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(step.cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the benchmarks keep what they finished in OUT.partial
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return f"stopped at its limit of {limit_s:.0f} s"
    return "ok" if code == 0 else f"failed (exit code {code})"


def check_flags(step: Step) -> str:
    """A benchmark command's flags against its script's signature (project.cli.unknown_flag): '' if all known."""
    if not step.cmd[1].endswith(".py"):
        return ""
    from project.cli import unknown_flag

    script = importlib.import_module(Path(step.cmd[1]).stem)
    return unknown_flag(step.cmd[2:], set(inspect.signature(script.main).parameters)) or ""


def refuse(message: str):
    print(f"gpu-check: {message}", file=sys.stderr)
    sys.exit(2)


def dry_run() -> int:
    """Print every step as it would run on a GPU with bf16 and every package, with any unknown flag."""
    steps, _ = plan(bf16=True, missing={})
    problems = {step.name: check_flags(step) for step in steps}
    for step in steps:
        print(f"{step.name} (at most {step.cap_s:.0f} s): {shlex.join(step.cmd)}")
        if problems[step.name]:
            print(f"  {problems[step.name]}")
    return 1 if any(problems.values()) else 0


def run_all(budget_s: float, gpu: str) -> int:
    """Run the steps that can run within the budget; write and print what ran and what was skipped."""
    import torch

    start = time.monotonic()
    steps, skipped = plan(cuda_has_bf16(torch.device("cuda")), prerequisites())
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    ran = []
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if left < MIN_STEP_S:
            skipped.append(f"{step.name}: no time left ({left:.0f} s of the budget)")
            continue
        log_path = OUT / "logs" / f"{step.name}.log"
        print(f"== {step.name}: {shlex.join(step.cmd)}", flush=True)
        t0 = time.monotonic()
        status = run_step(step, min(step.cap_s, left), log_path)
        ran.append((step, status, time.monotonic() - t0))
        print(f"   {status} in {ran[-1][2]:.0f} s (log: {log_path})", flush=True)
    summary = [
        "# GPU check",
        "",
        f"`make gpu-check` on {gpu}, {datetime.date.today().isoformat()}, in {time.monotonic() - start:.0f} s.",
        "",
        "| step | status | seconds | command |",
        "|---|---|---|---|",
        *[f"| {s.name} | {status} | {sec:.0f} | `{shlex.join(['python', *s.cmd[1:]])}` |" for s, status, sec in ran],
        "",
        "Skipped:" if skipped else "Nothing skipped.",
        *[f"- {why}" for why in skipped],
    ]
    (OUT / "gpu_check.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary[2:]))
    return 0 if all(status == "ok" for _, status, _ in ran) else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_s", type=float, default=570, help="wall-clock seconds for all steps together")
    parser.add_argument("--dry_run", action="store_true", help="print the steps and check their flags, run nothing")
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    if args.dry_run:
        sys.exit(dry_run())
    import torch

    if not torch.cuda.is_available():
        refuse(
            f"no CUDA GPU: this PyTorch ({torch.__version__}, {sys.executable}) sees none; run it on a machine with "
            "an NVIDIA GPU (make gpu-check GPU_PYTHON=... picks another Python; --dry_run prints the steps anywhere)"
        )
    gpu = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"gpu-check on {gpu}; budget {args.budget_s:.0f} s", flush=True)
    sys.exit(run_all(args.budget_s, gpu))


if __name__ == "__main__":
    main()
