"""Generate text with a Llama 3.x model: the embedded SmolLM2 default, your own checkpoint, or a random shape.

python inference.py                                   # sample chat prompts on the default model
python inference.py --prompt "The capital of France is" --chat False --max_gen_len 20
python inference.py --ckpt_dir ~/.llama/checkpoints/Llama3.2-1B --use_kv_cache False
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from llama.checkpoint import ModelSource
from llama.errors import UserError
from llama.generation import Llama
from llama.runtime import log
from project.cli import run
from project.quant import QuantConfig
from project.quant import quantize as quantize_model

SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
]


def read_prompt_file(path: str) -> str:
    """The whole text of a file (or of standard input for -), as one prompt."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt_file {path}: cannot read it as text ({e})") from None
    if not text.strip():
        raise UserError(f"--prompt_file {path} is empty")
    return text


def main(
    prompt: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    prompt_file: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    chat: bool = True,
    use_kv_cache: bool = True,
    max_gen_len: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    group_size: int = QuantConfig.group_size,
    quantize_output: str = QuantConfig.output,
    compile: bool = False,
    compile_mode: str = "default",
    seed: int = 0,
):
    """Print each prompt, its completion (streamed when prompts run one at a time) and tokens/s.

    --chat wraps each prompt in the model's chat format; --batch runs all prompts in one batch.
    --prompt_file reads one prompt, of any length, from a text file (- for standard input).
    --quantize int8|int4 stores the linear layers' weights in 8 / 4 bits (project/quant.py; int4 in groups of
    --group_size input columns); w8a8 stores them in 8 bits and also quantizes each token's activations to 8 bits,
    multiplying in integers (faster prefill and batched decode on x86 CPUs; a little more quality lost).
    --quantize_output sets the output projection's format apart: auto (int8 under int4 blocks, which costs far
    less quality than int4 there; else the blocks' format), none (unquantized), int8, int4 or w8a8.
    --compile decodes with torch.compile's static-shape step: faster per token (1.6-1.9x on a 2-core CPU), but
    the first prompt waits for the compilation (1-2 minutes there); worth it for long or many generations.
    --compile_mode sets torch.compile's mode: max-autotune-no-cudagraphs times candidate kernels for each matmul
    (about 4x the compilation time; on a 2-core CPU no consistent gain was measured: see the README).
    """
    if sum(p is not None for p in (prompt, prompts, prompt_file)) > 1:
        raise UserError("give one of --prompt, --prompts and --prompt_file")
    if prompt_file is not None:
        prompt = read_prompt_file("-" if prompt_file is True else str(prompt_file))  # fire reads "-" as a bare flag
    if isinstance(prompts, str):
        prompts = [prompts]
    # fire turns numeric-looking text into numbers; a prompt is always text
    texts = [str(t) for t in ([prompt] if prompt is not None else list(prompts or SAMPLE_PROMPTS))]
    if max_gen_len < 1:
        raise UserError("--max_gen_len must be at least 1")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, not {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], not {top_p}")
    if top_k < 0:
        raise UserError(f"--top_k must be 0 (off) or a positive count, not {top_k}")
    quant = QuantConfig(str(quantize), int(group_size), str(quantize_output))
    llama = Llama.build(
        ModelSource(ckpt_dir, shape, seed), device=device, dtype=dtype, compile=compile, compile_mode=str(compile_mode)
    )
    if quant.mode != "none":
        log(quantize_model(llama.model, quant))
    tok = llama.tokenizer
    encode = (
        (lambda t: tok.encode_dialog([{"role": "user", "content": t}])) if chat else (lambda t: tok.encode(t, bos=True))
    )
    settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, use_kv_cache=use_kv_cache, seed=seed)
    print(
        f"# KV cache {'on' if use_kv_cache else 'off'}, {'chat' if chat else 'plain'} prompts, "
        f"temperature {temperature}, top_p {top_p}, top_k {top_k}\n"
    )
    groups = [texts] if batch else [[t] for t in texts]
    for group in groups:
        ids = [encode(t) for t in group]
        stream = len(group) == 1
        if stream:
            print(f">>> {group[0]}\n", flush=True)
        start = time.perf_counter()
        out = llama.generate(ids, max_gen_len, on_token=TextStream(tok) if stream else None, **settings)
        elapsed = time.perf_counter() - start
        n_new = sum(len(t) for t in out.tokens)
        for text, gen in zip(group, out.tokens):
            if not stream:
                print(f">>> {text}\n\n{tok.decode(gen)}")
            print()
        print(
            f"[{n_new} tokens in {elapsed:.2f}s: {n_new / elapsed:.1f} tokens/s; prefill {out.prefill_s:.2f}s, "
            f"decode {out.decode_s:.2f}s]\n",
            flush=True,
        )


class TextStream:
    """`on_token` callback for one prompt: prints the text each new token adds, up to the first stop token.

    Decoding the whole reply each time (not token by token) keeps multi-byte characters split across
    tokens intact."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed, self.stopped = tokenizer, [], 0, False

    def __call__(self, step: int, next_ids):
        token = int(next_ids[0])
        self.stopped = self.stopped or token in self.tokenizer.stop_ids
        if self.stopped:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest of its bytes
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


if __name__ == "__main__":
    run(main)
