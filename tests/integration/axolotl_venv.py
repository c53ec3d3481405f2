"""The Axolotl virtual environment the integration tests run real Axolotl in (made by
scripts/axolotl-venv.sh; `$DFT_PEFT_AXOLOTL_VENV` points at another), and how they call its Python."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("DFT_PEFT_AXOLOTL_VENV") or REPO / ".venv-axolotl")
PYTHON = VENV / "bin" / "python"

# pytestmark of a module that needs the venv's Python: skipped, saying why, where there is none.
NEEDS_AXOLOTL_PYTHON = [
    pytest.mark.axolotl,
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON.exists(),
        reason=f"no Axolotl venv at {VENV}: run scripts/axolotl-venv.sh (or point DFT_PEFT_AXOLOTL_VENV at one)",
    ),
]


def run_in_axolotl(args: list[str], timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """The venv's Python on `args`, offline, on the CPU, with none of this process's Python settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")}
    env.update(AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([str(PYTHON), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
