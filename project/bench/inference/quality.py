"""What each weight format costs in quality: perplexity on a fixed held-out passage (data/heldout.txt) and
greedy agreement with the unquantized model on fixed chat prompts. One fresh child process per format
(project.bench.harness), like every other measurement:  python -m project.bench.inference.quality SPEC RESULT
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from llama.checkpoint import REPO_ROOT, ModelSource
from llama.generation import Llama
from project.bench.harness import child_main, run_child
from project.quant import QuantConfig, quantize

HELDOUT = REPO_ROOT / "data" / "heldout.txt"
PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the square of a number.",
]
GREEDY_TOKENS = 32
CHILD = "project.bench.inference.quality"


def measure(spec: dict, result: dict):
    """Perplexity of the passage (every token predicted from the ones before it) and greedy continuations."""
    device = torch.device(spec["device"])
    llama = Llama.build(ModelSource(**spec["source"]), device=str(device), dtype=spec["dtype"])
    result["quantization"] = quantize(llama.model, QuantConfig(**spec["quant"]))
    tok = llama.tokenizer
    ids = torch.tensor([tok.encode(HELDOUT.read_text(), bos=True)], device=device)
    ids = ids[:, : llama.model.args.max_seq_len]
    with torch.inference_mode():
        logits = llama.model(ids)[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:]).item()
    prompts = [tok.encode_dialog([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = [llama.generate([p], GREEDY_TOKENS, stop_at_eos=False).tokens[0] for p in prompts]
    result.update(nll=nll, perplexity=math.exp(nll), tokens=ids.shape[1] - 1, greedy=greedy)


def run_quality(source: ModelSource, dtype: str, device: str, quants: list[QuantConfig], folder: Path) -> list[dict]:
    """One row per weight format; agreement is measured against the unquantized model (run first)."""
    formats = [QuantConfig()] + [q for q in quants if q.mode != "none"]
    results = []
    for quant in formats:
        spec = {"device": device, "dtype": dtype, "source": asdict(source), "quant": asdict(quant)}
        results.append(
            (quant, run_child(CHILD, spec, folder, "quality-" + quant.name.replace(", ", "+").replace(" ", "-")))
        )
    ref = results[0][1]
    rows = []
    for quant, r in results:
        row = {"quantize": quant.name, "dtype": dtype, "status": r["status"], "message": r.get("message", "")}
        if r["status"] == "ok":
            row.update(perplexity=r["perplexity"], nll=r["nll"], tokens=r["tokens"], quantization=r["quantization"])
            if ref["status"] == "ok":
                row["perplexity_change"] = r["perplexity"] / ref["perplexity"] - 1
                row.update(agreement(ref["greedy"], r["greedy"]))
        rows.append(row)
    return rows


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    """How long each greedy continuation stays identical to the reference's, and how many stay so throughout."""
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(ref, other)]
    return {
        "same_prefix_tokens": sum(same) / len(same),
        "identical_prompts": sum(s == len(x) for s, x in zip(same, ref)),
        "prompts": len(ref),
    }


if __name__ == "__main__":
    child_main(measure)
