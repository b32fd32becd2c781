"""Batched generation: prefill + decode, with or without the KV cache.

`prefill` runs the prompt once; `decode_one_token` runs one step after it; `Llama.generate` samples between them
and times the two phases. Prompts of different lengths are left-padded to a common length; `Transformer.forward`'s
`pad_lens` shifts each row's positions and hides its padding, so every row computes what it would alone.
Shapes: B batch, P padded prompt length, L = P + max_gen_len, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import ModelSource
from .errors import UserError
from .model import LONG_ROW, Transformer, fuse_projections, lower_materialize
from .runtime import describe, log, resolve_device, resolve_dtype, synchronize
from .tokenizer import Message


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per row: the generated ids, cut before the first stop token
    prefill_s: float = 0.0  # prompt forward pass + first token
    decode_s: float = 0.0  # every later token
    steps: int = 0  # tokens generated per row (including any after a row stopped)
    kv_cache_bytes: int = 0
    stopped: list[bool] = field(default_factory=list)


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """logits (B, V) fp32 -> next ids (B,). Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: Transformer, tokens: torch.Tensor, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """The prompt's forward pass: tokens (B, P) left-padded, pad_lens (B,) or None -> logits (B, 1, V) of the last
    prompt position, for the first new token. With the KV cache set up, this fills its positions [0, P)."""
    return model(tokens, 0, pad_lens, last_only=True)


def decode_one_token(
    model: Transformer, tokens: torch.Tensor, cur: int, pad_lens: Optional[torch.Tensor], use_kv_cache: bool
) -> torch.Tensor:
    """One decode step: tokens (B, L) filled up to cur -> logits (B, 1, V) of position cur-1, for tokens[:, cur].

    With the KV cache only the newest token, tokens[:, cur-1], is fed (at position cur-1; the earlier keys come
    from the cache); without it the whole prefix tokens[:, :cur] is run again.
    """
    if use_kv_cache:
        return model(tokens[:, cur - 1 : cur], cur - 1, pad_lens, last_only=True)
    return model(tokens[:, :cur], 0, pad_lens, last_only=True)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's
CACHE_BLOCK = 256  # compiled decoding: KV cache lengths are rounded up to a multiple, so one graph serves many calls


def _clock(device: torch.device) -> float:
    """perf_counter() once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def check_compile_mode(mode: str):
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")


def compile_step(step, device: torch.device, mode: str):
    """torch.compile(step) with static shapes in the given mode. On CPU its wrapper is C++ (inductor's cpp_wrapper),
    which calls the step's few hundred kernels without Python in between: ~10 % less time a step on the default
    model at batch 1 (bf16, 2 threads; README), for about twice the first compilation. And on CPU the weights are
    frozen (inductor's freezing: they enter the compiled code as constants, not as ~245 inputs passed and checked at
    every call): 12.93 -> 11.80 ms a token on the default model in bf16, 10.82 -> 10.40 with int8, 85.5 -> 81.1 on
    the 1B shape (one process, medians of interleaved calls). The constants are the weight tensors themselves, not
    copies (resident memory the same): a weight changed in place, or replaced, is what the next step uses (tested)."""
    lower_materialize()
    if device.type != "cpu":
        return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    options = {**torch._inductor.list_mode_options(mode), "cpp_wrapper": True, "freezing": True}
    return torch.compile(step, fullgraph=True, dynamic=False, options=options)


class Llama:
    """A model and its tokenizer, ready to generate.

    compile: decode with Transformer.step compiled by torch.compile (static shapes: compiled once per batch size
    and cache length, which is rounded up to a multiple of CACHE_BLOCK); the first generate call pays for the
    compilation. Prefill and cache-off decoding are not compiled (their shapes change with every prompt).
    compile_mode: torch.compile's mode; max-autotune-no-cudagraphs times each matmul's candidate kernels and keeps
    the fastest, for about 4x the compilation time (whether it pays: reports/inference_decode, README)."""

    def __init__(
        self, model: Transformer, tokenizer, device: torch.device, compile: bool = False, compile_mode: str = "default"
    ):
        check_compile_mode(compile_mode)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.step = compile_step(model.step, device, compile_mode) if compile else None

    @staticmethod
    def build(
        source: ModelSource = ModelSource(),
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        compile_mode: str = "default",
    ) -> Llama:
        """Load source's model (default: the embedded SmolLM2) on the device in the dtype, fuse its projections for
        inference (llama.model.fuse_projections; with compile on CPU, long rows in blocks), and say what was
        loaded. The blocks only serve the compiled step: eager calls sum several bf16-rounded matrix-vector products
        instead of one, which on the 1B shape took the eager decode from 1.25x to 0.91x transformers' speed and
        changed its greedy tokens (bf16, one benchmark run each)."""
        check_compile_mode(compile_mode)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        start = time.perf_counter()
        model, tokenizer = source.load(dt, dev)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        fuse_projections(model, LONG_ROW if compile and dev.type == "cpu" else None)
        log(f"loaded {source.name}: {n:.1f}M parameters in {time.perf_counter() - start:.1f}s; {describe(dev, dt)}")
        return Llama(model, tokenizer, dev, compile, compile_mode)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        use_kv_cache: bool = True,
        stop_at_eos: bool = True,
        seed: Optional[int] = None,
        on_token: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> GenerationOutput:
        """Generate up to max_gen_len tokens for each prompt; on_token(step, ids (B,)) sees each new column."""
        model, tok = self.model, self.tokenizer
        if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
            raise UserError("every prompt needs at least one token")
        B, lens = len(prompt_tokens), [len(p) for p in prompt_tokens]
        prompt_len, total = max(lens), max(lens) + max_gen_len
        if total > model.args.max_seq_len:
            raise UserError(
                f"prompt of {prompt_len} tokens + {max_gen_len} new tokens exceeds the model's context of "
                f"{model.args.max_seq_len}: shorten the prompt or lower --max_gen_len"
            )
        tokens = torch.full((B, total), tok.pad_id, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, prompt_len - len(p) : prompt_len] = torch.tensor(p, dtype=torch.long)
        pads = [prompt_len - n for n in lens]
        pad_lens = torch.tensor(pads, device=self.device) if any(pads) else None
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        stop_ids = torch.tensor(sorted(tok.stop_ids), device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out = GenerationOutput(tokens=[])

        cur = prompt_len  # tokens[:, :cur] are filled

        def append(logits: torch.Tensor) -> bool:
            """Sample column cur from logits (B, 1, V), store and stream it; True once every row has stopped."""
            nonlocal cur
            nxt = sample(logits[:, -1].float(), temperature, top_p, top_k, generator)
            tokens[:, cur] = nxt
            if on_token is not None:
                on_token(cur - prompt_len, nxt)
            cur += 1
            if not stop_at_eos:
                return False
            done.logical_or_(torch.isin(nxt, stop_ids))
            return bool(done.all())  # the one host sync per token, and only with stop_at_eos

        static = self.step is not None and use_kv_cache
        if use_kv_cache:
            cache_len = min(-(-total // CACHE_BLOCK) * CACHE_BLOCK, model.args.max_seq_len) if static else total
            model.setup_cache(B, cache_len)
            out.kv_cache_bytes = model.cache_nbytes()
        if static:  # the compiled step's inputs, updated in place: the same tensors (shapes, strides) at every step
            pos, last = (torch.zeros(n, dtype=torch.long, device=self.device) for n in ((1,), (B, 1)))
        try:
            start = _clock(self.device)
            finished = max_gen_len == 0 or append(prefill(model, tokens[:, :cur], pad_lens))
            prefilled = _clock(self.device)
            while not finished and cur < total:
                if static:
                    # After this call's first step (guards checked, compiled if new) every step passes the same
                    # tensors: torch.compile's guards need not be evaluated again (~0.8 ms a step, SmolLM2, CPU).
                    with torch.compiler.set_stance(skip_guard_eval_unsafe=cur > prompt_len + 1):
                        logits = self.step(last.copy_(tokens[:, cur - 1 : cur]), pos.fill_(cur - 1), pad_lens)
                else:
                    logits = decode_one_token(model, tokens, cur, pad_lens, use_kv_cache)
                finished = append(logits)
            end = _clock(self.device)
        finally:
            model.clear_cache()
        out.prefill_s, out.decode_s, out.steps = prefilled - start, end - prefilled, cur - prompt_len

        for row in tokens[:, prompt_len:cur].tolist():
            stop_at = next((j for j, t in enumerate(row) if t in tok.stop_ids), None) if stop_at_eos else None
            out.tokens.append(row if stop_at is None else row[:stop_at])
            out.stopped.append(stop_at is not None)
        return out

    def text_completion(self, prompts: Sequence[str], max_gen_len: int = 64, **kw) -> list[dict]:
        """Complete raw text prompts (BOS added where the model uses one)."""
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        out = self.generate(ids, max_gen_len, **kw)
        return [{"generation": self.tokenizer.decode(t), "tokens": t} for t in out.tokens]

    def chat_completion(self, dialogs: Sequence[Sequence[Message]], max_gen_len: int = 64, **kw) -> list[dict]:
        """Answer each dialog (a list of {"role", "content"} messages) in the model's chat format."""
        ids = [self.tokenizer.encode_dialog(d) for d in dialogs]
        out = self.generate(ids, max_gen_len, **kw)
        return [
            {"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}, "tokens": t} for t in out.tokens
        ]
