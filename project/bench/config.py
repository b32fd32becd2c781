"""The configurations a benchmark run sweeps, and the job description each subprocess receives."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Optional

from llama.errors import UserError

KV_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


@dataclass
class Job:
    """One configuration, run `warmup + repeats` times in one fresh process by one engine."""

    engine: str  # "ours" (llama.generation) or "hf" (transformers' generate)
    kv_cache: bool
    batch_size: int
    input_len: int
    output_len: int
    device: str
    dtype: str
    threads: int
    repeats: int
    warmup: int
    ckpt_dir: Optional[str] = None
    shape: Optional[str] = None
    seed: int = 0
    hf_dir: Optional[str] = None  # the same weights in Hugging Face layout (converted), for engine "hf"
    prompt: Optional[list[int]] = None  # exact prompt ids; None: build them from the model's tokenizer
    extra: dict = field(default_factory=dict)

    def label(self) -> str:
        kv = "on " if self.kv_cache else "off"
        return f"{self.engine:4s} kv {kv} batch {self.batch_size:3d} in {self.input_len} out {self.output_len}"

    def to_dict(self) -> dict:
        return asdict(self)


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


def grid(batch_sizes, input_lens, output_lens, kv: str, engines: list[str], **common) -> list[Job]:
    """Every combination, ordered so that each engine's cache-on and cache-off runs sit next to each other."""
    if kv not in KV_MODES:
        raise UserError(f"--kv must be on, off or both (got {kv!r})")
    jobs = []
    for i, o, b, cache, engine in itertools.product(input_lens, output_lens, batch_sizes, KV_MODES[kv], engines):
        jobs.append(Job(engine=engine, kv_cache=cache, batch_size=b, input_len=i, output_len=o, **common))
    return jobs
