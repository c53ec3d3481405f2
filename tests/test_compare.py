"""`dft-peft compare` on the tiny model: one table with the prior figures and every variant, each
variant trained into its own folder under output_dir, and a second call trains nothing again."""

from __future__ import annotations

import json

import pytest
from tiny_run import config_dict, tiny_model_dir, write_jsonl, write_yaml

import dft_peft.train as train_module
from dft_peft.cli import main
from dft_peft.cli.compare import parse_variants
from dft_peft.errors import UserError

ROWS = [
    {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}\n#### {a + b}", "answer": str(a + b)}
    for a, b in [(2, 3), (4, 4), (10, 7), (6, 1), (9, 9), (3, 8), (5, 5), (7, 2)]
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_parse_variants():
    v = parse_variants("sft, dft,dft_alpha=0.5,eaft_k=5,dft+dft_sft_special_tokens=true")
    assert [(x.loss, x.params) for x in v] == [
        ("sft", {}), ("dft", {}), ("dft", {"dft_alpha": 0.5}), ("eaft", {"eaft_k": 5}), ("dft", {"dft_sft_special_tokens": True}),
    ]
    assert v[2].folder == "dft_alpha-0.5"
    for bad, needle in [("sft,sfd", "sfd"), ("dft_alph=0.5", "dft_alph"), ("dft_alpha=2", "dft_alpha"), ("sft,sft", "twice"), ("sft+dft_alpha=0.5", "dft_alpha")]:
        with pytest.raises(UserError, match=needle):
            parse_variants(bad)


def test_compare_table_and_resume(model_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:3])
    cfg = config_dict(model_dir, data, tmp_path / "out", max_steps=2, dft_alpha=0.9, prior_check_rows=4)
    path = write_yaml(tmp_path / "cfg.yml", cfg)
    args = ["compare", str(path), "--losses", "sft,dft_alpha=0.5", "--eval-dataset", str(test), "--max-new-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Prior check (4 rows" in out and "| base |" in out and "| sft |" in out and "| dft_alpha=0.5 |" in out
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["variant"] for r in report["variants"]] == ["base", "sft", "dft_alpha=0.5"]
    assert all(r["n"] == 3 for r in report["variants"])
    assert report["prior_check"]["rows"] == 4
    for folder, loss, params in [("sft", "sft", {}), ("dft_alpha-0.5", "dft", {"dft_alpha": 0.5})]:
        metrics = json.loads((tmp_path / "out" / folder / "train_metrics.json").read_text())
        assert metrics["loss"] == loss and metrics["loss_params"] == params and metrics["global_step"] == 2
    assert (tmp_path / "out" / "compare.md").read_text().startswith("Prior check")

    # Resume: nothing is trained again; the table is the same.
    calls = []
    monkeypatch.setattr(train_module, "train", lambda cfg: calls.append(cfg))
    assert main(args) == 0
    assert calls == []
    again = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["accuracy"] for r in again["variants"]] == [r["accuracy"] for r in report["variants"]]

    # A folder holding another objective's run is not taken for this variant.
    (tmp_path / "out" / "dft").mkdir()
    for name in ("adapter_config.json", "train_metrics.json"):
        (tmp_path / "out" / "dft" / name).write_text((tmp_path / "out" / "sft" / name).read_text())
    assert main(["compare", str(path), "--losses", "dft"]) == 2
    assert "holds a run of `loss: sft`" in capsys.readouterr().err
