"""The configurations an inference benchmark sweeps, and the spec each child process receives."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Optional

from llama.checkpoint import ModelSource
from llama.errors import UserError
from project.quant import QuantConfig

KV_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


@dataclass
class Spec:
    """One configuration, run `warmup + repeats` times in one fresh child process by one stack."""

    stack: str  # "ours" (llama.generation) or "hf" (transformers' generate)
    kv_cache: bool
    batch_size: int
    input_len: int
    output_len: int
    device: str
    dtype: str
    threads: int
    repeats: int
    warmup: int
    source: ModelSource = ModelSource()
    quant: QuantConfig = QuantConfig()  # weight-only quantization of our stack (project/quant.py)
    compile: bool = False  # our stack: decode with the compiled static-shape step (llama.generation.Llama)
    compile_mode: str = "default"  # torch.compile's mode for it (llama.generation.COMPILE_MODES)
    hf_dir: Optional[str] = None  # the same weights in Hugging Face layout (converted), for stack "hf"
    gguf: Optional[str] = None  # stack "llamacpp": the GGUF file holding quant's counterpart (llamacpp.py)
    prompt: Optional[list[int]] = None  # exact prompt ids; None: build them from the model's tokenizer
    simulate_oom: bool = False  # raise torch.OutOfMemoryError after loading (tests the OOM path)

    @property
    def name(self) -> str:
        kv = "on " if self.kv_cache else "off"
        weights = f" {self.quant.name}" if self.quant.mode != "none" else ""
        weights += f" {self.decode}" if self.compile else ""
        return f"{self.stack:4s}{weights} kv {kv} batch {self.batch_size:3d} in {self.input_len} out {self.output_len}"

    @property
    def decode(self) -> str:
        """How our stack decodes: 'eager', 'compiled', or 'compiled (MODE)' for a torch.compile mode besides default."""
        if not self.compile:
            return "eager"
        return "compiled" if self.compile_mode == "default" else f"compiled ({self.compile_mode})"

    def matches(self, selector: str) -> bool:
        """True if every key=value of selector (e.g. "batch_size=2,kv_cache=off") holds for this spec."""
        have = {
            "stack": self.stack,
            "kv_cache": "on" if self.kv_cache else "off",
            "batch_size": str(self.batch_size),
            "input_len": str(self.input_len),
            "output_len": str(self.output_len),
        }
        wanted = dict(item.split("=", 1) for item in selector.split(",") if "=" in item)
        return bool(wanted) and all(have.get(k) == v for k, v in wanted.items())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(**{**d, "source": ModelSource(**d["source"]), "quant": QuantConfig(**d["quant"])})


def int_list(value, name: str) -> list[int]:
    """Fire gives `--batch_sizes 1,8,16` as a tuple, `--batch_sizes 4` as an int, `"1 8"` as a string."""
    if isinstance(value, (int, str)):
        value = str(value).replace(",", " ").split()
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"--{name} must be a list of whole numbers, e.g. --{name} 1,8,16 (got {value!r})") from None
    if not out or min(out) < 1:
        raise UserError(f"--{name} needs at least one value, each at least 1 (got {value!r})")
    return out


COMPILE_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def grid(
    batch_sizes,
    input_lens,
    output_lens,
    kv: str,
    stacks: list[str],
    quants: list[QuantConfig],
    compile: str = "off",
    compile_modes: tuple[str, ...] = ("default",),
    **common,
) -> list[Spec]:
    """Every combination, ordered so that each stack's cache-on and cache-off runs sit next to each other.

    Compiled decoding is ours only, once per torch.compile mode of compile_modes; Hugging Face runs once per
    configuration, with the model's own weights; llama.cpp runs each weight format's counterpart
    (project/bench/inference/llamacpp.py), at batch 1 with its cache. A compiled decode needs the KV cache
    (without it, decoding is the plain path)."""
    if kv not in KV_MODES:
        raise UserError(f"--kv must be on, off or both (got {kv!r})")
    if compile not in COMPILE_MODES:
        raise UserError(f"--compile must be off, on or both (got {compile!r})")
    modes = {False: ("default",), True: tuple(compile_modes)}  # the torch.compile modes of an eager / compiled row
    ours = [("ours", q, c, m) for q in quants for c in COMPILE_MODES[compile] for m in modes[c]]
    variants = ours + [(s, QuantConfig(), False, "default") for s in stacks if s == "hf"]
    # llama.cpp's file for a mode is one whatever our output projection's format: run it once per mode
    per_mode = {}
    for q in quants:
        per_mode.setdefault(q.mode, q)
    variants += [("llamacpp", q, False, "default") for q in per_mode.values() if "llamacpp" in stacks]
    return [
        Spec(stack=stack, kv_cache=cache, batch_size=b, input_len=i, output_len=o, quant=quant, compile=c,
             compile_mode=mode, **common)
        for i, o, b, cache, (stack, quant, c, mode) in itertools.product(
            input_lens, output_lens, batch_sizes, KV_MODES[kv], variants
        )
        if (cache or not c) and (stack != "llamacpp" or (cache and b == 1))
    ]  # fmt: skip
