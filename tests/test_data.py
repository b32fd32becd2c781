"""The Alpaca recipe on hand-made records: templates, label masking, EOS, BOS, truncation, validation, collation."""

import json

import pytest
import torch
from tiny_finetune import BOS, EOS, PAD, byte_tokenizer

from llama.errors import UserError
from project import data
from project.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    build_dataset,
    collate,
    find_dataset,
    split_heldout,
    tokenize_record,
    validate_records,
)


def test_labels_mask_exactly_the_prompt_and_end_with_eos():
    tok = byte_tokenizer()  # one token per byte, so lengths can be counted by hand
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    ex = tokenize_record(record, tok, max_seq_len=1000)
    n = len(prompt.encode())
    assert ex.input_ids == list(prompt.encode()) + [ord("h"), ord("i"), EOS]
    assert ex.labels == [IGNORE_INDEX] * n + [ord("h"), ord("i"), EOS]
    assert ex.labels[-1] == EOS and not ex.truncated


def test_input_template_and_eos_is_the_id_not_its_text():
    tok = byte_tokenizer()
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5 <|im_end|>"}
    ex = tokenize_record(record, tok, 1000)
    text = tok.decode([t for t in ex.input_ids])
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\n2 and 3\n\n### Response:\n5 <|im_end|><|im_end|>" in text
    # The literal text "<|im_end|>" in the output is bytes; only the appended EOS is the special id.
    assert ex.input_ids.count(EOS) == 1 and ex.input_ids[-1] == EOS
    assert PROMPT_WITH_INPUT.count("{input}") == 1 and "{input}" not in PROMPT_NO_INPUT


def test_bos_added_once_when_the_tokenizer_has_one():
    with_bos = tokenize_record({"instruction": "x", "output": "y"}, byte_tokenizer(bos=True), 1000)
    without = tokenize_record({"instruction": "x", "output": "y"}, byte_tokenizer(bos=False), 1000)
    assert with_bos.input_ids[0] == BOS and with_bos.input_ids.count(BOS) == 1
    assert with_bos.input_ids[1:] == without.input_ids and BOS not in without.input_ids
    assert with_bos.labels[0] == IGNORE_INDEX


def test_truncation_is_counted_and_prompt_only_records_are_dropped():
    tok = byte_tokenizer()
    short = {"instruction": "a", "output": "b"}
    long_output = {"instruction": "a", "output": "b" * 50}
    long_prompt = {"instruction": "a" * 30, "output": "b"}
    n_prompt = len(tokenize_record(short, tok, 1000).input_ids) - 2  # minus "b" and EOS
    ds = build_dataset([short, long_output, long_prompt], tok, max_seq_len=n_prompt + 10)
    assert len(ds) == 2 and ds.n_truncated == 1 and ds.n_dropped == 1
    cut = ds.examples[1]
    assert len(cut.input_ids) == n_prompt + 10 and cut.labels[-1] == ord("b") and EOS not in cut.input_ids
    assert ds.examples[0].labels[-1] == EOS
    with pytest.raises(UserError, match="max_seq_len"):
        build_dataset([short], tok, max_seq_len=n_prompt)  # only the prompt fits: nothing to learn


def test_validation_reports_by_index_and_skips_or_stops(capsys):
    records = [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "", "output": "empty instruction"},
        {"instruction": "no output"},
        {"instruction": "bad input", "input": 3, "output": "x"},
        "not a record",
        {"instruction": "ok too", "input": "", "output": "fine"},
    ]
    good = validate_records(records, "skip")
    assert [r["instruction"] for r in good] == ["ok", "ok too"]
    err = capsys.readouterr().err
    for i in (1, 2, 3, 4):
        assert f"skipping record {i}" in err
    with pytest.raises(UserError, match="record 1 "):
        validate_records(records, "stop")
    with pytest.raises(UserError):
        validate_records([records[1]], "skip")


def test_collate_pads_inputs_with_a_token_and_labels_with_ignore():
    tok = byte_tokenizer()
    ds = build_dataset([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "bbbb"}], tok, 1000)
    ids, labels = collate(ds.examples, tok.pad_id)
    a, b = ds.examples
    assert ids.shape == labels.shape == (2, len(b.input_ids)) and ids.dtype == torch.long
    assert ids[0, : len(a.input_ids)].tolist() == a.input_ids
    assert (ids[0, len(a.input_ids) :] == PAD).all() and (labels[0, len(a.labels) :] == IGNORE_INDEX).all()
    assert ids[1].tolist() == b.input_ids and labels[1].tolist() == b.labels


def test_find_dataset_order_and_download(tmp_path, monkeypatch):
    mine = tmp_path / "mine.json"
    mine.write_text("[]")
    assert find_dataset(str(mine)) == mine
    with pytest.raises(UserError, match="does not exist"):
        find_dataset(str(tmp_path / "missing.json"))

    local, shared = tmp_path / "data" / "alpaca_data_200.json", tmp_path / "shared" / "alpaca_data_200.json"
    monkeypatch.setattr(data, "DEFAULT_DATA", local)
    monkeypatch.setattr(data, "SHARED_DATA", shared)
    shared.parent.mkdir()
    shared.write_text("[]")
    assert find_dataset() == shared
    local.parent.mkdir()
    local.write_text("[]")
    assert find_dataset() == local

    # Neither copy: download the original (here a local file:// URL) and keep the first 200 records.
    local.unlink()
    shared.unlink()
    original = tmp_path / "alpaca_data.json"
    original.write_text(json.dumps([{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(250)]))
    assert find_dataset(url=original.as_uri()) == local
    kept = json.loads(local.read_text())
    assert len(kept) == 200 and kept[0]["instruction"] == "i0" and kept[-1]["instruction"] == "i199"
    local.unlink()
    with pytest.raises(UserError, match="cannot download"):
        find_dataset(url=(tmp_path / "nowhere.json").as_uri())


# ---- the held-out split ------------------------------------------------------------------------------------
def _records(n):
    return [{"instruction": f"Task {i}.", "input": "", "output": f"answer {i}"} for i in range(n)]


def test_heldout_split_is_deterministic_disjoint_and_independent_of_order():
    records = _records(50)
    train, held, indices = split_heldout(records, 7)
    assert len(held) == 7 and len(train) == 43 and [records[i] for i in indices] == held
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert split_heldout(records, 7) == (train, held, indices)  # deterministic
    shuffled = records[::-1]  # the same records, another order: the same ones are held out
    assert {r["instruction"] for r in split_heldout(shuffled, 7)[1]} == {r["instruction"] for r in held}
    assert len(split_heldout(records)[1]) == 5  # default: a tenth


def test_heldout_duplicates_go_together_and_bad_counts_are_refused():
    records = _records(10)
    train, held, _ = split_heldout(records, 1)
    twin = dict(held[0])
    train2, held2, _ = split_heldout(records + [twin], 1)
    assert held2 == [held[0], twin] and train2 == train  # a copy of a held-out record is never trained on
    assert split_heldout(records, 0) == (records, [], [])
    with pytest.raises(UserError, match="leaves no training records"):
        split_heldout(records, 10)
    with pytest.raises(UserError, match="0 or more"):
        split_heldout(records, -1)
