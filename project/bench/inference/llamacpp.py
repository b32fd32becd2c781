"""The llama.cpp side of `--compare llamacpp`: the engine a CPU user would pick instead, on the same weights.

The parent writes our loaded model as a GGUF file (llama/export.py, in the run's dtype) and has llama.cpp's own
quantizer make the counterparts of our weight formats from it: int8 per channel -> Q8_0 (a scale per 32 weights),
int4 with a scale and a minimum per group -> Q4_1 (the same scheme, groups of 32; its quantizer keeps the output
projection, tied to the embedding or not, at Q8_0, as our int4 keeps it at int8 per channel). The child generates with
llama-cpp-python (an optional benchmark dependency that compiles llama.cpp on install, never a runtime one):
the same prompt ids, greedy (argmax of the last logits), exactly `output_len` tokens, the same threads, batch 1
(its `Llama` object decodes one sequence), llama.cpp's default KV cache (f16).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llama.errors import UserError
from llama.runtime import log
from project.bench.inference.config import Spec
from project.bench.inference.measure import measure, settled_memory
from project.bench.inference.prompt import tokens_sha

INSTALL = "pip install llama-cpp-python (it compiles llama.cpp: about 12 minutes on 2 cores)"
# Our weight format -> llama.cpp's counterpart. Its Q8_0 dot products also quantize the activations to 8 bits
# (blocks of 32), so Q8_0 serves both int8 and w8a8.
GGUF_FOR = {"none": None, "int8": "q8_0", "int4": "q4_1", "w8a8": "q8_0"}
GGUF_FROM_DTYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def check_installed():
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"--compare llamacpp needs llama-cpp-python: {INSTALL}")


def gguf_files(model, tokenizer, dtype: str, quant_modes: list[str], folder: Path) -> dict[str, str]:
    """{llama.cpp weight type: GGUF path}: model written in the run's dtype, and llama.cpp's counterparts of each of
    our weight formats quantized from that file."""
    import llama_cpp

    from llama.export import save_gguf

    base = GGUF_FROM_DTYPE[dtype]
    log(f"writing the weights as a {base} GGUF for llama.cpp ...")
    files = {base: str(save_gguf(model, tokenizer, folder / f"model-{base}.gguf", base))}
    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}
    for mode in quant_modes:
        kind = GGUF_FOR.get(mode)
        if kind is None or kind in files:
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftypes[kind]
        params.nthread = torch.get_num_threads()
        path = folder / f"model-{kind}.gguf"
        with quiet_c_output():  # llama.cpp logs a line per tensor (its own error is the return code)
            failed = llama_cpp.llama_model_quantize(files[base].encode(), str(path).encode(), params)
        if failed:
            raise UserError(f"llama.cpp could not quantize {files[base]} to {kind}")
        files[kind] = str(path)
    return files


@contextlib.contextmanager
def quiet_c_output():
    """Send what C code writes to standard output and error (file descriptors 1 and 2) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    with open(os.devnull, "w") as null:
        for fd in (1, 2):
            os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def run_llamacpp(spec: Spec, device: torch.device, result: dict) -> list[dict]:
    import llama_cpp

    if spec.batch_size != 1:
        raise UserError("llama-cpp-python's Llama decodes one sequence: --compare llamacpp runs batch size 1 only")
    if not spec.prompt:
        raise UserError("the llama.cpp run needs the prompt ids of our run (it ran out before building them)")
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec.gguf,
        n_ctx=spec.input_len + spec.output_len,
        n_batch=max(512, spec.input_len),
        n_threads=spec.threads,
        n_threads_batch=spec.threads,
        use_mmap=False,  # read into memory, as our loader does, so the baseline holds the weights
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    result.update(
        load_s=time.perf_counter() - start,
        prompt=spec.prompt,
        weights_bytes=Path(spec.gguf).stat().st_size,
        baseline_bytes=settled_memory(device),
        llama_cpp_version=llama_cpp.__version__,
    )

    def next_token() -> int:
        """Greedy: the argmax of the logits of the last position llama.cpp evaluated."""
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def generate_once(n: int) -> dict:
        llm.reset()
        start = time.perf_counter()
        llm.eval(spec.prompt)
        tokens = [next_token()]
        prefilled = time.perf_counter()
        while len(tokens) < n:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        end = time.perf_counter()
        return dict(
            prefill_s=prefilled - start,
            decode_s=end - prefilled,
            kv_cache_bytes=None,  # llama.cpp's own, sized by n_ctx
            n_generated=len(tokens),
            tokens_sha=tokens_sha([tokens]),
        )

    return measure(generate_once, device, spec.warmup, spec.repeats, spec.output_len)
