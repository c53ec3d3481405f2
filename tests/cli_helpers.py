"""Fixtures for tests that call `dft_peft.cli` in-process (import them into the module).

`main` sets offline/progress-bar defaults in os.environ and turns the datasets progress bars off
(stderr is not a terminal under pytest); `restore_cli_state` keeps both out of other tests.
"""

from __future__ import annotations

import os

import pytest
from tiny_run import tiny_model_dir

ERROR_PREFIX = "dft-peft: error: "


@pytest.fixture(autouse=True)
def restore_cli_state(monkeypatch):
    from datasets.utils.tqdm import are_progress_bars_disabled, enable_progress_bars

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(key, os.environ.get(key, "1" if key != "TOKENIZERS_PARALLELISM" else "false"))
    bars_were_on = not are_progress_bars_disabled()
    yield
    if bars_were_on:
        enable_progress_bars()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved with a tokenizer (tests/tiny_run.py)."""
    return tiny_model_dir(tmp_path_factory)
