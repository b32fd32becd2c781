"""One benchmark configuration in a fresh process:  python -m project.bench.worker JOB.json RESULT.json

Writes RESULT.json with status "ok" (and one entry per measured repeat), "OOM" or "error". A fresh process
per configuration means no peak, allocator cache or compiled kernel carries over from the previous one.
Setting LLAMA_BENCH_SIMULATE_OOM to e.g. "batch_size=2,kv_cache=off" makes matching jobs raise
torch.OutOfMemoryError before generating (how the tests check that a sweep survives an OOM).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from llama.checkpoint import atomic_write
from llama.errors import UserError
from project.bench.config import Job
from project.bench.measure import measure, settled_memory
from project.bench.prompt import prompt_tokens, tokens_sha
from project.memory import parameter_bytes

SIMULATE_OOM = "LLAMA_BENCH_SIMULATE_OOM"


def simulated_oom(job: Job) -> bool:
    spec = os.environ.get(SIMULATE_OOM, "")
    if not spec:
        return False
    wanted = dict(item.split("=", 1) for item in spec.split(","))
    have = {"batch_size": str(job.batch_size), "kv_cache": "on" if job.kv_cache else "off",
            "input_len": str(job.input_len), "output_len": str(job.output_len), "engine": job.engine}  # fmt: skip
    return all(have.get(k) == v for k, v in wanted.items())


def run_ours(job: Job, device: torch.device, result: dict) -> list[dict]:
    from llama.generation import Llama

    start = time.perf_counter()
    llama = Llama.build(ckpt_dir=job.ckpt_dir, shape=job.shape, device=str(device), dtype=job.dtype, seed=job.seed)
    result["load_s"] = time.perf_counter() - start
    prompt = job.prompt or prompt_tokens(llama.tokenizer, job.input_len)
    result.update(prompt=prompt, weights_bytes=parameter_bytes(llama.model), baseline_bytes=settled_memory(device))
    batch = [prompt] * job.batch_size
    if simulated_oom(job):
        raise torch.OutOfMemoryError(f"simulated by {SIMULATE_OOM}")

    def generate_once(n: int) -> dict:
        out = llama.generate(batch, n, use_kv_cache=job.kv_cache, stop_at_eos=False)
        return dict(prefill_s=out.prefill_s, decode_s=out.decode_s, kv_cache_bytes=out.kv_cache_bytes,
                    n_generated=min(len(t) for t in out.tokens), tokens_sha=tokens_sha(out.tokens))  # fmt: skip

    return measure(generate_once, device, job.warmup, job.repeats, job.output_len)


def main(job_path: str, result_path: str):
    job = Job(**json.loads(Path(job_path).read_text()))
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    result: dict = {"status": "ok", "runs": []}
    try:
        if job.engine == "ours":
            result["runs"] = run_ours(job, device, result)
        elif job.engine == "hf":
            from project.bench.hf import run_hf

            result["runs"] = run_hf(job, device, result, simulated_oom(job))
        else:
            raise UserError(f"unknown engine {job.engine!r}")
    except (torch.OutOfMemoryError, MemoryError) as e:
        result.update(status="OOM", message=str(e).splitlines()[0] if str(e) else "out of memory")
    except UserError as e:
        result.update(status="error", message=str(e))
    except Exception as e:  # recorded, so that the sweep goes on; the traceback goes to the log
        traceback.print_exc()
        result.update(status="error", message=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    atomic_write(Path(result_path), lambda f: f.write(json.dumps(result).encode()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
