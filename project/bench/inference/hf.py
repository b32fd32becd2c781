"""The Hugging Face side of `--compare hf`: transformers' `generate` on the same weights and prompt.

Imported only inside a benchmark subprocess; the model library never imports transformers.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llama.checkpoint import DEFAULT_CKPT_DIR
from llama.errors import UserError
from llama.runtime import DTYPES, synchronize
from project.bench.inference.config import Spec
from project.bench.inference.measure import measure, settled_memory
from project.bench.inference.prompt import tokens_sha
from project.memory import parameter_bytes


def hf_source(ckpt_dir) -> tuple[str, dict]:
    """(path, from_pretrained kwargs) for a checkpoint transformers loads as it is: a GGUF file or an HF folder."""
    path = Path(ckpt_dir).expanduser() if ckpt_dir else DEFAULT_CKPT_DIR
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and not (path / "config.json").exists():
        return str(path), {"gguf_file": ggufs[0].name}
    if (path / "config.json").exists():
        return str(path), {}
    raise UserError(f"--compare hf cannot load {path} directly; it needs a Hugging Face folder or a GGUF file")


def run_hf(spec: Spec, device: torch.device, result: dict) -> list[dict]:
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

    if not spec.prompt:
        raise UserError("the Hugging Face run needs the prompt ids of our run (it ran out before building them)")
    path, kwargs = (spec.hf_dir, {}) if spec.hf_dir else hf_source(spec.source.ckpt_dir)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[spec.dtype], attn_implementation="sdpa", **kwargs)
    model = model.to(device).eval()
    if device.type == "cpu":
        # from_pretrained memory-maps safetensors: pages become resident only when first read, which would
        # leave them out of the after-loading baseline. Read one element per page so the baseline holds them.
        with torch.no_grad():
            for p in model.parameters():
                p.reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    result.update(
        load_s=time.perf_counter() - start,
        prompt=spec.prompt,
        weights_bytes=parameter_bytes(model),
        baseline_bytes=settled_memory(device),
        transformers_version=transformers.__version__,
        hf_source=str(Path(path) / kwargs.get("gguf_file", "")),
    )
    if spec.simulate_oom:
        raise torch.OutOfMemoryError("simulated out of memory (--simulate_oom)")
    ids = torch.tensor([spec.prompt] * spec.batch_size, device=device)

    class FirstLogits(LogitsProcessor):
        """Notes when the prompt's forward pass has produced the first logits (the end of prefill)."""

        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                synchronize(device)
                self.at = time.perf_counter()
            return scores

    def generate_once(n: int) -> dict:
        # Greedy, exactly n new tokens: no EOS (nothing stops early or masks a logit), no sampling settings.
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=spec.kv_cache,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        first = FirstLogits()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                logits_processor=LogitsProcessorList([first]),
            )
        synchronize(device)
        end = time.perf_counter()
        new = out.sequences[:, ids.shape[1] :]
        if new.shape[1] != n:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens instead of {n}")
        return dict(
            prefill_s=first.at - start,
            decode_s=end - first.at,
            kv_cache_bytes=cache_bytes(out),
            n_generated=new.shape[1],
            tokens_sha=tokens_sha(new.tolist()),
        )

    return measure(generate_once, device, spec.warmup, spec.repeats, spec.output_len)


def cache_bytes(out) -> int:
    """Bytes of the key/value tensors in the cache generate returns (0 without a cache)."""
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if torch.is_tensor(t))
    return sum(t.nbytes for kv in cache for t in kv if torch.is_tensor(t))
