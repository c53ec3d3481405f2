"""`dataset_prepared_path`: reuse on identical inputs, rebuild when anything that matters changes."""

from __future__ import annotations

import os

import pytest
from test_data_helpers import make_tokenizer, write_jsonl

from dft_peft.data import DatasetConfig, prepare_datasets
from dft_peft.data import tokenize as tokmod

ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(8)]


@pytest.fixture()
def setup(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    return tmp_path, data, make_tokenizer()


def _run(data, tok, prepared, **kw):
    kw.setdefault("sequence_len", 512)
    return prepare_datasets([DatasetConfig(path=str(data))], tok, prepared_path=str(prepared), **kw)


def _entries(prepared):
    return sorted(p.name for p in prepared.iterdir())


def test_second_run_reuses_and_matches(setup, monkeypatch):
    tmp, data, tok = setup
    prepared = tmp / "prepared"
    first = _run(data, tok, prepared, sample_packing=True, val_set_size=2)
    assert not first.from_cache and len(_entries(prepared)) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(tokmod, "tokenize_dataset", boom)
    second = _run(data, tok, prepared, sample_packing=True, val_set_size=2)
    assert second.from_cache
    assert second.train.to_list() == first.train.to_list()
    assert second.eval.to_list() == first.eval.to_list()
    assert second.report == first.report and second.packing == first.packing


@pytest.mark.parametrize(
    "change",
    [
        {"sequence_len": 256},
        {"train_on_inputs": True},
        {"sample_packing": True},
        {"excess_length_strategy": "truncate"},
        {"val_set_size": 2},
        {"seed": 7},
    ],
)
def test_setting_change_makes_new_entry(setup, change):
    tmp, data, tok = setup
    prepared = tmp / "prepared"
    _run(data, tok, prepared)
    out = _run(data, tok, prepared, **change)
    assert not out.from_cache and len(_entries(prepared)) == 2


def test_data_file_change_makes_new_entry(setup):
    tmp, data, tok = setup
    prepared = tmp / "prepared"
    _run(data, tok, prepared)
    write_jsonl(data, ROWS[:5])
    os.utime(data, ns=(1, 1))  # also differ in mtime even on coarse-clock filesystems
    out = _run(data, tok, prepared)
    assert not out.from_cache and len(out.train) == 5


def test_tokenizer_change_makes_new_entry(setup):
    tmp, data, tok = setup
    prepared = tmp / "prepared"
    _run(data, tok, prepared)
    assert not _run(data, make_tokenizer(bos=False), prepared).from_cache
    other_template = make_tokenizer(chat_template="{{ messages }}")
    assert not _run(data, other_template, prepared).from_cache


def test_no_temp_folders_left_and_incomplete_entry_ignored(setup):
    tmp, data, tok = setup
    prepared = tmp / "prepared"
    _run(data, tok, prepared)
    (entry,) = list(prepared.iterdir())
    assert not entry.name.startswith(".")
    (entry / "prepared.json").unlink()  # as if a run died before finishing this folder
    out = _run(data, tok, prepared)
    assert not out.from_cache
    assert _entries(prepared) == [entry.name] and (entry / "prepared.json").is_file()
