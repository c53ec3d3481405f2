"""The shipped quickstart data: shape, answers, disjointness, and that it prepares cleanly."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_data_helpers import make_tokenizer, trained_text

from dft_peft.data import DatasetConfig, prepare_datasets

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_files_are_small():
    total = sum((DATA / n).stat().st_size for n in ("gsm_train.jsonl", "gsm_test.jsonl", "chat_sample.jsonl"))
    assert total < 1_000_000


def test_gsm_rows_end_with_answer_and_splits_are_disjoint():
    train, test = _rows("gsm_train.jsonl"), _rows("gsm_test.jsonl")
    assert 350 <= len(train) <= 450 and 80 <= len(test) <= 120
    for row in train + test:
        assert set(row) >= {"instruction", "input", "output"}
        assert re.search(r"\n#### -?[\d.]+$", row["output"])
        # the same exchange as chat messages, for `type: chat_template` (the quickstart's format)
        assert row["messages"] == [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]},
        ]
    for row in test:
        assert row["output"].endswith(f"#### {row['answer']}")
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}


def test_chat_sample_roles():
    rows = _rows("chat_sample.jsonl")
    assert len(rows) == 20
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)


def test_quickstart_data_prepares(tmp_path):
    tok = make_tokenizer()
    out = prepare_datasets(
        [DatasetConfig(path=str(DATA / "chat_sample.jsonl"), type="chat_template")], tok, sequence_len=4096
    )
    assert out.report.rows_kept == 20
    first = _rows("chat_sample.jsonl")[0]["messages"][2]["content"]
    assert trained_text(tok, out.train[0]["input_ids"], out.train[0]["labels"]) == first + "<|im_end|>"
