"""The GPU benchmarks run on CPU with tiny shapes (`--smoke`), so CI proves they execute; the
numbers they exist for come from a CUDA machine (`bash benchmarks/gpu/run.sh`)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_loss_benchmark_smoke_runs_as_a_script(tmp_path):
    out = tmp_path / "loss.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "loss.py"), "--smoke", "--tokens", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} >= {"naive sft", "fused sft", "naive dft", "fused dft"}
    values = {r["case"]: r["value"] for r in rows}
    # the fused and naive paths compute the same objective on the same numbers
    assert values["fused dft"] == pytest.approx(values["naive dft"], rel=1e-5)
    assert values["fused sft"] == pytest.approx(values["naive sft"], rel=1e-5)
    assert "time/naive" in done.stdout


def test_e2e_benchmark_smoke_builds_a_4bit_model_and_trains(tmp_path):
    import bitsandbytes as bnb

    e2e = load("e2e")
    model = e2e.build_model(e2e.SMOKE, "cpu", torch.float32)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * e2e.SMOKE["num_hidden_layers"]
    assert all(m.weight.quant_state is not None for m in linears)  # quantized as built
    # what the planner is calibrated on is what it plans: its bytes match the built model's
    from test_planner import quantized_bytes

    from dft_peft.memory import planner

    shape = planner.shape_from_config({**e2e.SMOKE, "model_type": "llama"})
    setup = planner.Setup(act_bytes=4, upcast_frozen=False)
    assert planner.weight_bytes(shape, setup) == pytest.approx(quantized_bytes(model), rel=0.01)
    out = tmp_path / "e2e.json"
    report = e2e.main(["--smoke", "--tokens", "32", "--checkpointing", "true", "offload", "--json", str(out)])
    steps = report["steps"]
    assert {(s["loss"], s["checkpointing"]) for s in steps} == {
        ("naive", True), ("fused", True), ("naive", "offload"), ("fused", "offload")
    }
    assert all(s["tokens_per_s"] > 0 and s["planned_reserved"] > 0 for s in steps)
    assert json.loads(out.read_text())["steps"]
