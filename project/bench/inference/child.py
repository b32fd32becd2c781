"""One inference configuration in a fresh process:  python -m project.bench.inference.child SPEC.json RESULT.json

Run by project.bench.harness.run_child; writes RESULT.json with status "ok" and one entry per measured
repeat under "runs", or "OOM" / "error" with a message.
"""

from __future__ import annotations

import time

import torch

from llama.errors import UserError
from project.bench.harness import child_main
from project.bench.inference.config import Spec
from project.bench.inference.measure import measure, settled_memory
from project.bench.inference.prompt import prompt_tokens, tokens_sha
from project.memory import decode_read_bytes, weight_bytes
from project.quant import quantize


def run_ours(spec: Spec, device: torch.device, result: dict) -> list[dict]:
    from llama.generation import Llama

    start = time.perf_counter()
    llama = Llama.build(
        spec.source, device=str(device), dtype=spec.dtype, compile=spec.compile, compile_mode=spec.compile_mode
    )
    result["quantization"] = quantize(llama.model, spec.quant)
    result["load_s"] = time.perf_counter() - start
    prompt = spec.prompt or prompt_tokens(llama.tokenizer, spec.input_len)
    result.update(
        prompt=prompt,
        weights_bytes=weight_bytes(llama.model),
        read_bytes=decode_read_bytes(llama.model),
        baseline_bytes=settled_memory(device),
    )
    batch = [prompt] * spec.batch_size
    if spec.simulate_oom:
        raise torch.OutOfMemoryError("simulated out of memory (--simulate_oom)")
    if spec.compile:  # the first call compiles the decode step; later calls of the same shapes reuse it
        start = time.perf_counter()
        llama.generate(batch, 2, stop_at_eos=False)
        result["compile_s"] = time.perf_counter() - start

    def generate_once(n: int) -> dict:
        out = llama.generate(batch, n, use_kv_cache=spec.kv_cache, stop_at_eos=False)
        return dict(
            prefill_s=out.prefill_s,
            decode_s=out.decode_s,
            kv_cache_bytes=out.kv_cache_bytes,
            n_generated=min(len(t) for t in out.tokens),
            tokens_sha=tokens_sha(out.tokens),
        )

    return measure(generate_once, device, spec.warmup, spec.repeats, spec.output_len)


def run(spec_dict: dict, result: dict):
    spec = Spec.from_dict(spec_dict)
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    result["threads"] = spec.threads
    if spec.stack == "ours":
        result["runs"] = run_ours(spec, device, result)
    elif spec.stack == "hf":
        from project.bench.inference.hf import run_hf

        result["runs"] = run_hf(spec, device, result)
    elif spec.stack == "llamacpp":
        from project.bench.inference.llamacpp import run_llamacpp

        result["runs"] = run_llamacpp(spec, device, result)
    else:
        raise UserError(f"unknown stack {spec.stack!r}")


if __name__ == "__main__":
    child_main(run)
