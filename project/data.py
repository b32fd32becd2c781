"""Stanford Alpaca instruction data: finding it, checking it, tokenising it, batching it.

The recipe is Alpaca's own (github.com/tatsu-lab/stanford_alpaca, train.py): the prompt template with or
without `input`, then the response followed by the tokenizer's EOS id; the loss sees only the response, so
every prompt position gets the label -100 (ignored by cross-entropy). The templates are plain text, not the
model's chat format, as in the original recipe.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import REPO_ROOT, atomic_write
from llama.errors import UserError
from llama.runtime import log

IGNORE_INDEX = -100  # the label of a position the loss skips (torch's cross_entropy default ignore_index)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
DEFAULT_DATA = REPO_ROOT / "data" / "alpaca_data_200.json"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "alpaca_data_200.json"
DEFAULT_RECORDS = 200


# ---- finding and loading the data -----------------------------------------------------------------------
def find_dataset(data: Optional[str] = None, url: str = ALPACA_URL) -> Path:
    """--data if given; else data/alpaca_data_200.json; else ../shared/data/; else download and keep 200 records."""
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise UserError(f"--data {path} does not exist: pass a JSON file of instruction records, or omit --data")
        return path
    for path in (DEFAULT_DATA, SHARED_DATA):
        if path.exists():
            return path
    return download_alpaca(DEFAULT_DATA, url)


def download_alpaca(dest: Path, url: str = ALPACA_URL, n_records: int = DEFAULT_RECORDS) -> Path:
    """Fetch the original alpaca_data.json (52,002 records) and keep the first n_records in dest."""
    log(f"downloading {url} (Stanford Alpaca, CC BY-NC 4.0); keeping the first {n_records} records in {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            records = json.loads(response.read())
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot download the Alpaca data from {url} ({e}): put alpaca_data_200.json in data/ or pass --data"
        ) from None
    if not isinstance(records, list):
        raise UserError(f"{url} did not return a JSON list of records")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, json.dumps(records[:n_records], indent=2, ensure_ascii=False))
    return dest


def load_records(path: Path) -> list:
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a JSON list of {{instruction, input, output}} records")
    return records


def record_problem(record) -> Optional[str]:
    """Why a record is unusable, or None: instruction and output non-empty strings, input a string if present."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    for key in ("instruction", "output"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"has no non-empty string {key!r}"
    if "input" in record and not isinstance(record["input"], str):
        return f"has an 'input' that is a {type(record['input']).__name__}, not a string"
    return None


def validate_records(records: Sequence, on_bad: str = "skip") -> list[dict]:
    """The usable records; each bad one is reported by index and skipped (on_bad='skip') or stops the run ('stop')."""
    if on_bad not in ("skip", "stop"):
        raise UserError(f"--on_bad_record must be skip or stop, not {on_bad!r}")
    good = []
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem is None:
            good.append(record)
        elif on_bad == "stop":
            raise UserError(f"record {i} {problem}: fix it, or pass --on_bad_record skip")
        else:
            log(f"skipping record {i}: it {problem}")
    if not good:
        raise UserError("no usable records: every record needs non-empty 'instruction' and 'output' strings")
    return good


# ---- the held-out split --------------------------------------------------------------------------------------
def record_key(record: dict) -> str:
    """A record's place in the split: a hash of its text, so the split does not depend on the file's order."""
    text = "\x00".join(record.get(k, "") for k in ("instruction", "input", "output"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_heldout(records: Sequence[dict], n_heldout: Optional[int] = None) -> tuple[list[dict], list[dict], list[int]]:
    """(training records, held-out records, held-out indices into records): the n_heldout records (default a
    tenth, rounded down) with the smallest record_key are held out, the rest train, each list in file order.
    Identical duplicates of a held-out record are held out with it, so no held-out text is ever trained on."""
    if n_heldout is None:
        n_heldout = len(records) // 10
    if n_heldout < 0:
        raise UserError(f"--heldout must be 0 or more, not {n_heldout}")
    if n_heldout >= len(records):
        raise UserError(f"--heldout {n_heldout} leaves no training records (there are {len(records)}); lower it")
    keys = [record_key(r) for r in records]
    held_keys = set(sorted(set(keys))[:n_heldout])
    held = [i for i, k in enumerate(keys) if k in held_keys]
    train = [r for r, k in zip(records, keys) if k not in held_keys]
    if not train:
        raise UserError(f"--heldout {n_heldout} leaves no training records; lower it")
    return train, [records[i] for i in held], held


# ---- tokenising ----------------------------------------------------------------------------------------------
def format_prompt(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclass
class Example:
    input_ids: list[int]  # prompt + response + EOS (possibly truncated)
    labels: list[int]  # IGNORE_INDEX over the prompt, the token ids over the response
    truncated: bool = False


def tokenize_record(record: dict, tokenizer, max_seq_len: int) -> Example:
    """Prompt (with BOS if the tokenizer has one, once) and response + EOS id, cut to max_seq_len tokens."""
    prompt = tokenizer.encode(format_prompt(record), bos=True)
    response = tokenizer.encode(record["output"]) + [tokenizer.eos_id]
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


@dataclass
class Dataset:
    examples: list[Example]
    n_truncated: int = 0  # kept, but cut to max_seq_len (their EOS is lost)
    n_dropped: int = 0  # prompt alone fills max_seq_len: no response token left to learn from
    notes: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.examples)


def build_dataset(records: Sequence[dict], tokenizer, max_seq_len: int) -> Dataset:
    if max_seq_len < 2:
        raise UserError("--max_seq_len must be at least 2")
    ds = Dataset([])
    for i, record in enumerate(records):
        ex = tokenize_record(record, tokenizer, max_seq_len)
        # The label at position t is predicted from position t-1, so position 0's label never counts.
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            ds.n_dropped += 1
            ds.notes.append(f"record {i}: its prompt alone fills --max_seq_len {max_seq_len}; dropped")
            continue
        ds.n_truncated += ex.truncated
        ds.examples.append(ex)
    if not ds.examples:
        raise UserError(f"every record's prompt fills --max_seq_len {max_seq_len}: raise --max_seq_len")
    return ds


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids (B, T) with pad_id (a real token id), labels (B, T) with -100."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return input_ids, labels
