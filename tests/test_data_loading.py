"""Loading local files of every supported type, config validation, and the eval split."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from test_data_helpers import make_tokenizer, write_jsonl

from dft_peft.data import DatasetConfig, prepare_datasets
from dft_peft.data.loading import load_raw, split_eval
from dft_peft.errors import UserError

ROWS = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(10)]


def _write(tmp_path, kind: str):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", ROWS)
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
        return path
    if kind == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
        return path
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
        return path
    if kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        return next((tmp_path / "saved").glob("*.arrow"))
    if kind == "saved":
        ds.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if kind == "saved_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
        return tmp_path / "saved_dict"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow", "saved", "saved_dict"])
def test_loads_every_local_kind(tmp_path, kind):
    path = _write(tmp_path, kind)
    ds = load_raw(DatasetConfig(path=str(path)))
    assert [r["instruction"] for r in ds] == [r["instruction"] for r in ROWS]


def test_folder_of_files_and_data_files(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:4])
    write_jsonl(folder / "b.jsonl", ROWS[4:])
    assert len(load_raw(DatasetConfig(path=str(folder)))) == 10
    assert len(load_raw(DatasetConfig(path=str(folder), data_files="b.jsonl"))) == 6


def test_ds_type_overrides_unknown_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(UserError, match="set ds_type"):
        load_raw(DatasetConfig(path=str(path)))
    assert len(load_raw(DatasetConfig(path=str(path), ds_type="jsonl"))) == 10


def test_uncached_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    # The test run has HF_HUB_OFFLINE=1 (scripts/setup-env.sh); downloads are tested in test_hub.py.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(UserError, match="tatsu-lab/alpaca: the hub is unreachable or HF_HUB_OFFLINE=1 is set"):
        load_raw(DatasetConfig(path="tatsu-lab/alpaca"))


def test_missing_file_names_path(tmp_path):
    with pytest.raises(UserError, match=r"dataset path .*nope\.jsonl does not exist"):
        load_raw(DatasetConfig(path=str(tmp_path / "nope.jsonl")))


def test_malformed_file_names_path(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 1: not valid JSON"):
        load_raw(DatasetConfig(path=str(bad)))


def test_config_rejects_unknown_keys_and_types():
    with pytest.raises(ValidationError, match="feild"):
        DatasetConfig(path="x.jsonl", feild="text")
    with pytest.raises(ValidationError, match="Did you mean `alpaca`"):
        DatasetConfig(path="x.jsonl", type="alpacca")
    with pytest.raises(ValidationError, match="min_weight"):
        DatasetConfig(path="x.jsonl", min_weight=0.5)


def test_config_defaults_and_legacy_keys():
    cfg = DatasetConfig(path="x.jsonl", message_field_role="from", message_field_content="value")
    assert (cfg.type, cfg.split, cfg.field, cfg.field_messages, cfg.roles_to_train) == (
        "alpaca",
        "train",
        "text",
        "messages",
        ["assistant"],
    )
    assert (cfg.role_key, cfg.content_key) == ("from", "value")
    assert cfg.canonical_role("gpt") == "assistant" and cfg.canonical_role("human") == "user"


@pytest.mark.parametrize("size, expected", [(0.2, 2), (3, 3), (0, 0)])
def test_split_eval_sizes(size, expected):
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(10))})
    train, ev = split_eval(ds, size, seed=1)
    assert (0 if ev is None else len(ev)) == expected
    assert len(train) == 10 - expected
    if ev is not None:
        assert sorted(list(train["x"]) + list(ev["x"])) == list(range(10))
        assert list(split_eval(ds, size, seed=1)[1]["x"]) == list(ev["x"])  # the seed fixes the split


def test_split_eval_too_large():
    import datasets

    with pytest.raises(UserError, match="val_set_size: 10 rows"):
        split_eval(datasets.Dataset.from_dict({"x": list(range(10))}), 10, seed=1)


def test_test_datasets_are_the_eval_set(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:3])
    tok = make_tokenizer()
    out = prepare_datasets(
        [DatasetConfig(path=str(train))], tok, sequence_len=256, test_datasets=[DatasetConfig(path=str(test))]
    )
    assert len(out.train) == 10 and len(out.eval) == 3 and out.eval_report.rows_kept == 3
    with pytest.raises(UserError, match="either val_set_size or test_datasets"):
        prepare_datasets(
            [DatasetConfig(path=str(train))],
            tok,
            sequence_len=256,
            val_set_size=0.1,
            test_datasets=[DatasetConfig(path=str(test))],
        )


def test_packed_eval_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = prepare_datasets(
        [DatasetConfig(path=str(train))], make_tokenizer(), sequence_len=512, sample_packing=True, val_set_size=4
    )
    assert "position_ids" in out.train.column_names and "position_ids" in out.eval.column_names
    assert out.packing.rows == 6 and sum(p.count(0) for p in out.eval["position_ids"]) == 4
