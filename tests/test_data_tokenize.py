"""Tokenization: ids match the tokenizer on the full text, masks, length handling, report, weights."""

from __future__ import annotations

import pytest
from test_data_helpers import make_tokenizer, trained_text, write_jsonl

from dft_peft.data import DatasetConfig, prepare_datasets
from dft_peft.data import tokenize as tokmod
from dft_peft.data.formats import alpaca_prompt
from dft_peft.errors import UserError

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5."},
    {"instruction": "Multiply.", "input": "4 * 6", "output": "24"},
]


def _prepare(tmp_path, rows, tokenizer=None, cfg=None, **kwargs):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    kwargs.setdefault("sequence_len", 512)
    return prepare_datasets([DatasetConfig(path=str(path), **(cfg or {}))], tokenizer or make_tokenizer(), **kwargs)


def test_ids_equal_tokenizer_on_full_text_and_only_output_is_trained(tmp_path):
    tok = make_tokenizer()
    out = _prepare(tmp_path, ROWS, tok)
    for src, row in zip(ROWS, out.train):
        full = alpaca_prompt(src["instruction"], src["input"]) + src["output"] + "</s>"
        # Reference: the tokenizer itself on the whole string, BOS added by its post-processor.
        assert row["input_ids"] == tok(full)["input_ids"]
        assert row["input_ids"][0] == tok.bos_token_id
        assert trained_text(tok, row["input_ids"], row["labels"]) == src["output"] + "</s>"
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_train_on_inputs_trains_everything_after_bos(tmp_path):
    tok = make_tokenizer()
    row = _prepare(tmp_path, ROWS, tok, train_on_inputs=True).train[0]
    assert row["labels"][0] == -100  # the BOS has nothing before it to predict it from
    assert row["labels"][1:] == row["input_ids"][1:]


def test_no_bos_when_tokenizer_adds_none(tmp_path):
    tok = make_tokenizer(bos=False)
    row = _prepare(tmp_path, ROWS, tok).train[0]
    full = alpaca_prompt(ROWS[0]["instruction"]) + ROWS[0]["output"] + "</s>"
    assert row["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in row["input_ids"]


def test_text_that_spells_bos_is_not_doubled(tmp_path):
    tok = make_tokenizer()
    rows = [{"segments": [{"text": "<s>Q: hi\n", "label": False}, {"text": "A: yo</s>", "label": True}]}]
    row = _prepare(tmp_path, rows, tok, cfg={"type": "input_output"}).train[0]
    assert row["input_ids"].count(tok.bos_token_id) == 1
    assert row["input_ids"].count(tok.eos_token_id) == 1  # the text's own EOS, none appended
    assert trained_text(tok, row["input_ids"], row["labels"]) == "A: yo</s>"


def test_slow_tokenizer_fallback_gives_same_masks(tmp_path, monkeypatch):
    tok = make_tokenizer()
    fast = _prepare(tmp_path, ROWS, tok).train
    monkeypatch.setattr(tokmod, "supports_offsets", lambda _tok: False)
    slow = _prepare(tmp_path, ROWS, tok).train
    for a, b in zip(fast, slow):
        assert trained_text(tok, a["input_ids"], a["labels"]) == trained_text(tok, b["input_ids"], b["labels"])
        assert tok.decode(a["input_ids"]) == tok.decode(b["input_ids"])


def _lengths(tok, rows):
    return [len(tok(alpaca_prompt(r["instruction"], r["input"]) + r["output"] + "</s>")["input_ids"]) for r in rows]


def test_drop_long_rows_and_report(tmp_path):
    tok = make_tokenizer()
    rows = ROWS + [{"instruction": "Long.", "input": "", "output": "x " * 400}]
    lengths = _lengths(tok, rows)
    limit = max(lengths[:2])
    assert lengths[2] > limit
    out = _prepare(tmp_path, rows, tok, sequence_len=limit)
    rep = out.report
    assert (rep.rows_in, rep.rows_kept, rep.dropped_too_long, rep.truncated) == (3, 2, 1, 0)
    assert rep.total_tokens == sum(lengths[:2])
    assert rep.trainable_tokens == sum(sum(1 for lab in r["labels"][1:] if lab != -100) for r in out.train)
    assert len(out.train) == 2


def test_truncate_long_rows(tmp_path):
    tok = make_tokenizer()
    rows = ROWS + [{"instruction": "Long.", "input": "", "output": "x " * 400}]
    limit = max(_lengths(tok, rows[:2]))
    out = _prepare(tmp_path, rows, tok, sequence_len=limit, excess_length_strategy="truncate")
    assert (out.report.rows_kept, out.report.truncated, out.report.dropped_too_long) == (3, 1, 0)
    assert len(out.train[2]["input_ids"]) == limit
    full = tok(alpaca_prompt("Long.") + "x " * 400 + "</s>")["input_ids"]
    assert out.train[2]["input_ids"] == full[:limit]


def test_unknown_excess_length_strategy(tmp_path):
    with pytest.raises(UserError, match="excess_length_strategy: `trunc`.*Did you mean `truncate`"):
        _prepare(tmp_path, ROWS, excess_length_strategy="trunc")


def test_row_with_nothing_to_train_is_dropped(tmp_path):
    rows = ROWS + [{"instruction": "Say nothing.", "input": "", "output": ""}]
    out = _prepare(tmp_path, rows, cfg={"train_on_eos": "none"})
    assert (out.report.rows_kept, out.report.dropped_no_trainable) == (2, 1)


def test_missing_field_error_names_file_row_and_field(tmp_path):
    rows = ROWS + [{"instruction": "no output here"}]
    with pytest.raises(UserError) as err:
        _prepare(tmp_path, rows)
    msg = str(err.value)
    assert "data.jsonl row 3: missing field 'output' required by type: alpaca" in msg
    assert "\n" not in msg


def test_all_rows_dropped_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no training rows left.*raise sequence_len"):
        _prepare(tmp_path, ROWS, sequence_len=8)


def test_weights_column_and_min_weight(tmp_path):
    rows = [dict(ROWS[0], score=0.25), dict(ROWS[1], score=2), dict(ROWS[0], score="0.9")]
    out = _prepare(tmp_path, rows, cfg={"weight_field": "score", "min_weight": 0.5})
    assert out.report.dropped_low_weight == 1 and out.report.rows_kept == 2
    got = [sorted(set(r["weights"])) for r in out.train]
    assert got == [[2.0], [pytest.approx(0.9)]]
    assert all(len(r["weights"]) == len(r["input_ids"]) for r in out.train)


def test_no_weights_column_without_weight_field(tmp_path):
    assert "weights" not in _prepare(tmp_path, ROWS).train.column_names


def test_missing_or_bad_weight(tmp_path):
    with pytest.raises(UserError, match="row 1: missing field 'score' named by weight_field"):
        _prepare(tmp_path, ROWS, cfg={"weight_field": "score"})
    with pytest.raises(UserError, match="row 1: field 'score' must be a number"):
        _prepare(tmp_path, [dict(ROWS[0], score="high")], cfg={"weight_field": "score"})


def test_mixed_entries_get_unit_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(ROWS[0], w=3.0)])
    b = write_jsonl(tmp_path / "b.jsonl", [ROWS[1]])
    out = prepare_datasets(
        [DatasetConfig(path=str(a), weight_field="w"), DatasetConfig(path=str(b))], make_tokenizer(), sequence_len=512
    )
    assert [set(r["weights"]) for r in out.train] == [{3.0}, {1.0}]
