"""`dft-peft eval`: answer extraction and comparison on a table of cases, prompts built like
training, and an end-to-end run on a tiny random Llama whose JSON records are re-scored here."""

from __future__ import annotations

import json

import pytest
from test_data_helpers import TEST_CHATML, make_tokenizer
from test_probe import ROWS, build_tiny_model, save_random_adapter, write_config, write_rows

from dft_peft.cli import main
from dft_peft.data import DatasetConfig, alpaca_prompt
from dft_peft.evaluate.answers import (
    extract_answer,
    is_correct,
    normalize_answer,
    reference_answer,
    to_number,
    truncate_generation,
)
from dft_peft.evaluate.math_eval import evaluate
from dft_peft.evaluate.prompts import build_prompt

# ----------------------------------------------------------------------------- answers

EXTRACT_CASES = [
    ("So the total is 1,234 apples.\n#### 1,234", "1234"),
    ("#### 1234", "1234"),
    ("Thus the answer is \\boxed{\\frac{3}{4}}.", "3/4"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("The answer is \\boxed{0.75}", "0.75"),
    ("#### $5.00", "5"),
    ("#### \\$5.50", "5.5"),
    ("She is left with -7 dollars.\n#### -7", "-7"),
    ("\\boxed{-\\frac{1}{2}}", "-1/2"),
    ("#### 40%", "40"),
    ("#### 18 dollars", "18"),
    ("#### 12.", "12"),
    ("#### 3/4", "3/4"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{15 \\text{ apples}}", "15"),
    ("#### 5\n\nLater text mentions 99", "5"),
    ("first \\boxed{4} then corrected: #### 6", "6"),
    ("first #### 4 then \\boxed{\\frac{1}{3}}", "1/3"),
    ("No marker, but 3 + 4 = 7.", "7"),
    ("She pays 2,500 in total", "2500"),
    ("I cannot solve this problem.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "predicted,reference,ok",
    [
        ("1234", "1234", True),
        (extract_answer("#### 1,234"), "1234", True),
        (extract_answer("\\boxed{\\frac{3}{4}}"), "0.75", True),
        (extract_answer("\\boxed{0.75}"), "3/4", True),
        (extract_answer("#### $5.00"), "5", True),
        ("5.0", "5", True),
        ("-7", "-7", True),
        ("-7", "7", False),
        ("0.33333", "1/3", False),  # 1e-6 tolerance, not 1e-3
        ("0.3333333", "1/3", True),
        ("1000000", "1000000.0000001", True),  # relative above 1
        ("12", "13", False),
        (None, "5", False),
        ("5", None, False),
        ("x+1", "x+1", True),
        ("1/0", "0", False),
    ],
)
def test_is_correct(predicted, reference, ok):
    assert is_correct(predicted, reference) is ok


def test_normalize_and_number():
    assert normalize_answer("$1,234.50") == "1234.5"
    assert normalize_answer("+0.500") == "0.5"
    assert normalize_answer("-0") == "0"
    assert normalize_answer(".5") == "0.5"
    assert normalize_answer("  ") is None
    assert to_number("3/4") == 0.75 and to_number("-12") == -12.0 and to_number("abc") is None


def test_reference_answer():
    assert reference_answer({"answer": "59", "output": "#### 60"}) == "59"
    assert reference_answer({"answer": "He has 3 + 69 = 72.\n#### 72"}) == "72"  # GSM8K's answer field
    assert reference_answer({"output": "work\n#### 1,234"}) == "1234"
    assert reference_answer({"output": "so \\boxed{\\frac{1}{2}}"}) == "1/2"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\n#### 8"}]}
    assert reference_answer(chat) == "8"
    assert reference_answer({"output": "no final answer"}) is None


def test_truncate_generation():
    assert truncate_generation("a = 5\n#### 5\nMore text #### 6") == "a = 5\n#### 5"
    assert truncate_generation("x\n#### 5") == "x\n#### 5"  # no newline yet: kept whole
    assert truncate_generation("5 + 5 = 10\n### Instruction:\nnext") == "5 + 5 = 10"
    assert truncate_generation("#### \nstill going") == "#### \nstill going"  # no number on the line


def test_prompts_match_training():
    tok = make_tokenizer()
    row = {"instruction": "Add 2 and 3.", "input": "", "answer": "5"}
    alpaca = DatasetConfig(path="x.jsonl", type="alpaca")
    assert build_prompt(row, alpaca, tok, None, "row 1") == alpaca_prompt("Add 2 and 3.")
    with_input = {"instruction": "Add the numbers.", "input": "2 and 3", "answer": "5"}
    assert build_prompt(with_input, alpaca, tok, None, "row 1") == alpaca_prompt("Add the numbers.", "2 and 3")

    chat = DatasetConfig(path="x.jsonl", type="chat_template")
    expected = "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(row, chat, tok, TEST_CHATML, "row 1") == expected
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5\n#### 5"},
        ]
    }
    assert build_prompt(conversation, chat, tok, TEST_CHATML, "row 1") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + expected
    )


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = build_tiny_model(root / "model")
    data = write_rows(root / "train.jsonl", ROWS)
    test_rows = [dict(r) for r in ROWS[:4]]
    test_rows[1].pop("answer")  # reference from the `#### N` that ends `output`
    return {
        "root": root,
        "config": write_config(root / "cfg.yml", model_dir, data),
        "test": write_rows(root / "test.jsonl", test_rows),
        "adapter": save_random_adapter(model_dir, root / "sft", seed=3, loss="sft"),
    }


def test_eval_cli_records_are_consistent(tiny, capsys):
    out = tiny["root"] / "results.json"
    code = main(
        [
            "eval",
            str(tiny["config"]),
            "--dataset",
            str(tiny["test"]),
            "--adapter",
            str(tiny["adapter"]),
            "--max-new-tokens",
            "12",
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "base" in printed and "sft: " in printed
    result = json.loads(out.read_text())
    summary = {s["model"]: s for s in result["summary"]}
    assert list(summary)[0] == "base" and len(summary) == 2
    records = result["records"]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["reference"] for r in records] == ["19", "71", "24"]
    for r, row in zip(records, ROWS):
        assert r["prompt"] == alpaca_prompt(row["instruction"], row["input"])
    for label, s in summary.items():
        flags = []
        for r in records:
            entry = r["models"][label]
            assert entry["answer"] == extract_answer(entry["generation"])
            assert entry["correct"] == is_correct(extract_answer(entry["generation"]), r["reference"])
            assert 0 <= entry["tokens"] <= 12 and "samples" not in entry
            flags.append(entry["correct"])
        assert s["n"] == 3
        assert s["accuracy"] == pytest.approx(sum(flags) / 3)
        assert s["mean_tokens"] == pytest.approx(sum(r["models"][label]["tokens"] for r in records) / 3)
    # The two models are different models: their generations differ somewhere.
    assert any(r["models"]["base"]["generation"] != r["models"][list(summary)[1]]["generation"] for r in records)


def test_avg_at_k_is_seeded(tiny):
    from dft_peft.config import load_config

    cfg = load_config(tiny["config"])
    kwargs = dict(max_new_tokens=8, samples=2, temperature=1.0, limit=3, batch_size=2, seed=11)
    first = evaluate(cfg, tiny["test"], **kwargs).to_dict()
    second = evaluate(cfg, tiny["test"], **kwargs).to_dict()
    assert first == second
    (summary,) = first["summary"]
    samples = [r["models"]["base"]["samples"] for r in first["records"]]
    assert all(len(s) == 2 for s in samples)
    flags = [[is_correct(extract_answer(g["generation"]), r["reference"]) for g in s] for s, r in zip(samples, first["records"])]
    assert [[g["correct"] for g in s] for s in samples] == flags
    assert summary["avg@2"] == pytest.approx(sum(sum(f) / 2 for f in flags) / 3)
    assert summary["pass@2"] == pytest.approx(sum(any(f) for f in flags) / 3)
    # Sampling at temperature 1 from a random model: the two samples are not all identical.
    assert any(s[0]["generation"] != s[1]["generation"] for s in samples)
    third = evaluate(cfg, tiny["test"], **{**kwargs, "seed": 12}).to_dict()
    assert third["records"] != first["records"]


def test_eval_errors_are_one_line(tiny, tmp_path, capsys):
    no_answer = write_rows(tmp_path / "bad.jsonl", [{"instruction": "q", "input": "", "output": "no marker"}])
    assert main(["eval", str(tiny["config"]), "--dataset", str(no_answer)]) == 2
    assert "no reference answer" in capsys.readouterr().err
    assert main(["eval", str(tiny["config"]), "--dataset", str(tiny["test"]), "--samples", "2", "--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err
