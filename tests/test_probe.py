"""`dft-peft inspect`: the target-token probabilities it reports, against a float64 full-logits
computation written out here, on a tiny random Llama with two saved LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_data_helpers import make_tokenizer
from tiny_run import tiny_assets

from dft_peft.evaluate import probe
from dft_peft.cli import main
from dft_peft.data.formats import alpaca_prompt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"instruction": "Tom has 12 apples and buys 7 more. How many apples now?", "input": "", "output": "12 + 7 = 19\n#### 19", "answer": "19"},
    {"instruction": "Add the numbers.", "input": "23 and 48", "output": "23 + 48 = 71\n#### 71", "answer": "71"},
    {"instruction": "A box holds 6 pears. How many pears are in 4 boxes?", "input": "", "output": "6 * 4 = 24\n#### 24", "answer": "24"},
    {"instruction": "What is 90 - 35?", "input": "", "output": "90 - 35 = 55\n#### 55", "answer": "55"},
    {"instruction": "Half of 86 is?", "input": "", "output": "86 / 2 = 43\n#### 43", "answer": "43"},
    {"instruction": "the quick brown fox has 3 coins and finds 9 more. How many coins?", "input": "", "output": "3 + 9 = 12\n#### 12", "answer": "12"},
]


# ----------------------------------------------------------------------------- tiny assets


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """The test tokenizer (byte-level BPE, ~300 tokens, prepends <s>) and a random 2-layer Llama
    whose large head spreads p(y_t) over many decades, as a trained model's are."""
    tok = make_tokenizer()
    tok.save_pretrained(out_dir)
    return tiny_assets.save_random_llama(out_dir, tok, seed=seed, hidden_size=32, head_scale=40.0)


def save_random_adapter(model_dir: Path, out_dir: Path, seed: int, loss: str | None = None) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved like a trained one."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft.get_peft_model(model, lora).save_pretrained(out_dir)
    if loss:
        (out_dir / "train_metrics.json").write_text(json.dumps({"loss": loss}))
    return out_dir


def write_config(path: Path, model_dir: Path, data: Path, **extra) -> Path:
    cfg = {
        "base_model": str(model_dir),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "loss": "dft",
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "val_set_size": 0,
        "sequence_len": 256,
        "micro_batch_size": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "fp16": False,
        "attn_implementation": "eager",
        "output_dir": str(path.parent / "out"),
        "seed": 7,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model_dir = build_tiny_model(root / "model")
    data = write_rows(root / "train.jsonl", ROWS)
    return {
        "root": root,
        "model": model_dir,
        "data": data,
        "config": write_config(root / "cfg.yml", model_dir, data),
        "dft": save_random_adapter(model_dir, root / "dft", seed=1, loss="dft"),
        "other": save_random_adapter(model_dir, root / "other", seed=2),
    }


# ----------------------------------------------------------------------------- the reference


def reference_rows(model_dir: Path, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels written out independently: <s> + prompt (untrained) + output + </s>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in rows:
        prompt = alpaca_prompt(r["instruction"], r["input"])
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + r["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        ids = [tok.bos_token_id] + full
        labels = [-100] * (1 + len(prompt_ids)) + full[len(prompt_ids) :]
        out.append((ids, labels))
    return out


def reference_logp(model_dir: Path, rows, adapter: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ln p(y_t) from the full [T, vocab] logits of each row, one row at a time, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model = model.double().eval()
    lps, ids_out = [], []
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(labels[1:])
            keep = targets != -100
            lps.append(logp[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1).numpy())
            ids_out.append(targets[keep].numpy())
    return np.concatenate(lps), np.concatenate(ids_out)


def reference_counts(logp: np.ndarray) -> list[int]:
    edges = np.logspace(-8, 0, 41)
    return np.histogram(np.clip(np.exp(logp), 1e-8, 1.0), bins=edges)[0].tolist()


# ----------------------------------------------------------------------------- tests


def test_chunked_probabilities_equal_full_logits(tiny):
    """Small chunks and padded batches give the same p(y_t) as the full-logits reference."""
    from dft_peft.config import load_config
    from dft_peft.model.loading import load_for_inference

    cfg = load_config(tiny["config"])
    model, tokenizer = load_for_inference(cfg, tiny["dft"])
    rows = probe.load_rows(cfg, tokenizer, max_rows=None)
    ref_rows = reference_rows(tiny["model"], ROWS)
    assert rows.input_ids == [r[0] for r in ref_rows]
    assert rows.labels == [r[1] for r in ref_rows]
    logp, ids = probe.target_logprobs(model, rows, batch_size=4, chunk_rows=7, pad_id=tokenizer.pad_token_id)
    ref, ref_ids = reference_logp(tiny["model"], ref_rows, tiny["dft"])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logp, ref, rtol=1e-5, atol=1e-5)
    assert np.exp(ref).min() < 1e-4 and np.exp(ref).max() > 0.2  # the data spans the histogram


def test_inspect_cli_report_matches_reference(tiny, capsys):
    out = tiny["root"] / "report" / "inspect.png"
    code = main(
        [
            "inspect",
            str(tiny["config"]),
            "--adapter",
            str(tiny["dft"]),
            "--compare",
            str(tiny["other"]),
            "--max-rows",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 5000
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["rows"] == 5
    labels = [m["label"] for m in report["models"]]
    assert labels[0] == "base" and labels[1].startswith("dft: ") and labels[2].startswith("adapter: ")
    printed = capsys.readouterr().out
    assert "mean p" in printed and "base" in printed

    ref_rows = reference_rows(tiny["model"], ROWS[:5])
    refs = {
        "base": reference_logp(tiny["model"], ref_rows),
        labels[1]: reference_logp(tiny["model"], ref_rows, tiny["dft"]),
        labels[2]: reference_logp(tiny["model"], ref_rows, tiny["other"]),
    }
    for m in report["models"]:
        ref, _ = refs[m["label"]]
        p = np.exp(ref)
        assert m["tokens"] == ref.size == report["tokens"]
        np.testing.assert_allclose(m["bin_edges"], np.logspace(-8, 0, 41))
        assert m["counts"] == reference_counts(ref)
        assert m["mean_p"] == pytest.approx(p.mean(), rel=1e-5)
        assert m["median_p"] == pytest.approx(np.median(p), rel=1e-4)
        assert m["mean_log_p"] == pytest.approx(ref.mean(), rel=1e-5)
        assert m["frac_p_below_1e-3"] == pytest.approx((p < 1e-3).mean())
    base, dft, other = report["models"]
    assert base["counts"] != dft["counts"] and dft["counts"] != other["counts"]
    assert "movers" not in base

    # Movers: per token id (seen >= 3 times) mean change of ln p vs base, recomputed here.
    base_lp, ids = refs["base"]
    dft_lp, _ = refs[labels[1]]
    movers = dft["movers"]
    assert movers["min_count"] == 3 and movers["up"] and movers["down"]
    ups = [e["mean_delta_log_p"] for e in movers["up"]]
    downs = [e["mean_delta_log_p"] for e in movers["down"]]
    assert ups == sorted(ups, reverse=True) and all(v > 0 for v in ups)
    assert downs == sorted(downs) and all(v < 0 for v in downs)
    for e in movers["up"][:3] + movers["down"][:3]:
        sel = ids == e["token_id"]
        assert e["count"] == sel.sum() >= 3
        assert e["mean_delta_log_p"] == pytest.approx((dft_lp[sel] - base_lp[sel]).mean(), rel=1e-4, abs=1e-5)
    deltas = {t: (dft_lp[ids == t] - base_lp[ids == t]).mean() for t in set(ids.tolist()) if (ids == t).sum() >= 3}
    assert movers["up"][0]["token_id"] == max(deltas, key=deltas.get)
    assert movers["down"][0]["token_id"] == min(deltas, key=deltas.get)


def test_inspect_dataset_option_and_named_adapter(tiny, tmp_path):
    """--dataset formats another file like the config's first entry; NAME=DIR sets the label."""
    other_rows = write_rows(tmp_path / "held_out.jsonl", ROWS[3:])
    out = tmp_path / "r.png"
    code = main(["inspect", str(tiny["config"]), "--dataset", str(other_rows), "--compare", f"mine={tiny['other']}", "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["rows"] == 3 and report["dataset"] == str(other_rows)
    assert [m["label"] for m in report["models"]] == ["base", "mine"]
    ref, _ = reference_logp(tiny["model"], reference_rows(tiny["model"], ROWS[3:]))
    assert report["models"][0]["counts"] == reference_counts(ref)
    # The figure can be redrawn from the JSON alone.
    again = probe.InspectReport.from_dict(report)
    assert again.to_dict()["models"] == report["models"]
    probe.plot(again, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE


def test_inspect_errors_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    assert main(["inspect", str(tiny["config"]), "--adapter", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert main(["inspect", str(tiny["config"]), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["inspect", str(tiny["config"]), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install matplotlib" in err and "\n" not in err
