"""Axolotl-style LoRA/QLoRA configs for eight model families (tests/data/axolotl-configs/) load
and pass `dft-peft validate`.

They name the real hub models, as a user's file would; validate runs here with `--base_model`
pointed at a tiny local model of the same architecture (built from a config, saved with a local
tokenizer), so neither the hub nor the real weights are needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_helpers import make_tokenizer
from tiny_models import tiny_causal_lm

from dft_peft.cli import main
from dft_peft.config import load_config

CONFIGS = Path(__file__).resolve().parent / "data" / "axolotl-configs"
ARCH = {
    "llama-3-8b-instruct-qlora": "llama",
    "qwen2.5-7b-instruct-lora": "qwen2",
    "qwen3-8b-qlora": "qwen2",
    "mistral-7b-qlora": "mistral",
    "gemma-2-9b-lora": "gemma2",
    "gemma-3-4b-qlora": "gemma2",
    "phi-3-mini-lora": "phi3",
    "smollm2-135m-lora": "llama",
}


def test_eight_families_are_here():
    assert sorted(p.stem for p in CONFIGS.glob("*.yml")) == sorted(ARCH)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in set(ARCH.values()):
        folder = root / arch
        model = tiny_causal_lm(arch, max_position_embeddings=8192)  # the configs' sequence_len
        model.config.vocab_size = max(model.config.vocab_size, len(make_tokenizer()))
        model.save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.mark.parametrize("name", sorted(ARCH))
def test_config_loads_as_written(name):
    cfg = load_config(CONFIGS / f"{name}.yml")
    assert cfg.loss == "dft" and cfg.adapter in ("lora", "qlora")


@pytest.mark.parametrize("name", sorted(ARCH))
def test_config_validates(name, tiny_dirs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(CONFIGS / f"{name}.yml"), f"--base_model={tiny_dirs[ARCH[name]]}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "objective:   loss: dft" in out.out
