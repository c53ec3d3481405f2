"""dft-peft inside real Axolotl: `plugins: [dft_peft.integrations.axolotl.DFTPlugin]`, `loss: dft`.

Runs `axolotl train` (Axolotl 0.19.0, its own pinned transformers/peft) in the virtual
environment made by `scripts/axolotl-venv.sh` (`$DFT_PEFT_AXOLOTL_VENV`, default
`<repo>/.venv-axolotl`), on a tiny random Llama and a tiny Alpaca file built here: CPU, fp32,
a few steps. The tests are skipped, saying why, when that venv does not exist.

The first optimizer step's loss that Axolotl logs is checked against an independent float64
reference: naive full logits, `-(p.detach() * log p)` summed over the valid shifted target
tokens and divided by their count, computed here from the exact batch the trainer fed the model
(recorded by the test-only plugin `axolotl_recorder.FirstStepRecorder`); packed rows are split
into their sequences and each is run alone.

    scripts/axolotl-venv.sh && .venv/bin/python -m pytest tests/integration -m axolotl
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_assets

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV = Path(os.environ.get("DFT_PEFT_AXOLOTL_VENV") or REPO / ".venv-axolotl")
AXOLOTL = VENV / "bin" / "axolotl"
RUN_TIMEOUT = 300
EXAMPLE = REPO / "examples" / "yaml" / "axolotl-llama-3-8b-qlora-dft.yml"

needs_axolotl = [
    pytest.mark.axolotl,
    pytest.mark.slow,
    pytest.mark.skipif(
        not AXOLOTL.exists(),
        reason=f"no Axolotl venv at {VENV}: run scripts/axolotl-venv.sh "
        "(or point DFT_PEFT_AXOLOTL_VENV at one)",
    ),
]


def _apply(marks):
    def wrap(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------
# helpers


def axolotl_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(key, None)
    env.update(
        # `axolotl train` re-executes itself through `accelerate launch`, found on PATH.
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV),
        PYTHONPATH=str(HERE),  # the test-only recorder plugin
        AXOLOTL_DO_NOT_TRACK="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(home / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


@dataclass
class Run:
    returncode: int
    output: str
    out_dir: Path

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])

    def check(self) -> "Run":
        assert self.returncode == 0, f"axolotl train failed ({self.returncode}):\n{self.tail()}"
        return self

    def logs(self) -> list[dict[str, Any]]:
        path = self.out_dir / "logs.jsonl"
        assert path.exists(), f"no {path}:\n{self.tail()}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def first_step_log(self) -> dict[str, Any]:
        lines = [log for log in self.logs() if "loss" in log]
        assert lines and lines[0]["step"] == 1, f"no step-1 loss logged: {lines}\n{self.tail()}"
        return lines[0]

    def first_step(self) -> list[dict[str, Any]]:
        path = self.out_dir / "first_step.pt"
        assert path.exists(), f"the recorder wrote no {path}:\n{self.tail()}"
        return torch.load(path, weights_only=False)


def run_axolotl(work: Path, name: str, cfg: dict[str, Any], launcher: str | None = "python") -> Run:
    """`axolotl train <name>.yml`. Axolotl's default launcher re-executes the run through
    `accelerate launch` (a second ~12 s of imports); `--launcher python` trains in-process,
    the same single-process run on a CPU, so most tests use it."""
    work.mkdir(parents=True, exist_ok=True)
    config = tiny_assets.write_config(work / f"{name}.yml", cfg)
    command = [str(AXOLOTL), "train", str(config)]
    if launcher is not None:
        command += ["--launcher", launcher]
    proc = subprocess.run(
        command,
        cwd=work,
        env=axolotl_env(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    (work / f"{name}.log").write_text(proc.stdout)
    return Run(proc.returncode, proc.stdout, Path(cfg["output_dir"]))


@dataclass
class Reference:
    dft: float
    ce: float
    p_mean: float
    count: int


def _segments(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]]:
    """[start, end) of each packed sequence in a row (positions restart at 0)."""
    if position_ids is None:
        return [(0, length)]
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [length]))


def reference_first_step(model_dir: Path, micro_batches: list[dict[str, Any]]) -> Reference:
    """Float64, naive full logits, every sequence run on its own: the step's objective."""
    from transformers import AutoModelForCausalLM

    # LoRA's B matrices start at zero, so before the first update the adapted model is the base.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    dft_sum = ce_sum = p_sum = 0.0
    count = 0
    for micro in micro_batches:
        inputs = micro["inputs"]
        ids, labels = inputs["input_ids"], inputs["labels"]
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        for row in range(ids.shape[0]):
            segments = _segments(None if positions is None else positions[row], ids.shape[1])
            for start, end in segments:
                seg_ids, seg_labels = ids[row, start:end], labels[row, start:end]
                if start > 0:
                    # a packed sequence's first token is a prompt token, never a target: the
                    # cross-boundary prediction the packed forward makes does not count
                    assert seg_labels[0].item() == -100
                if mask is not None:  # right padding
                    keep = mask[row, start:end].bool()
                    seg_ids, seg_labels = seg_ids[keep], seg_labels[keep]
                if seg_ids.numel() < 2:
                    continue
                with torch.no_grad():
                    logits = model(input_ids=seg_ids[None]).logits[0, :-1].double()
                targets = seg_labels[1:]
                valid = targets != -100
                logp = torch.log_softmax(logits, dim=-1)
                logp = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0][valid]
                p = logp.exp()
                dft_sum += float((-(p.detach() * logp)).sum())
                ce_sum += float((-logp).sum())
                p_sum += float(p.sum())
                count += int(valid.sum())
    assert count > 0
    return Reference(dft_sum / count, ce_sum / count, p_sum / count, count)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("axolotl")
    model_dir = tiny_assets.build_model(root / "tiny-llama")
    data = tiny_assets.write_alpaca(root / "alpaca.jsonl")
    return {"root": root, "model": model_dir, "data": data}


def _config(assets: dict[str, Path], name: str, **overrides: Any) -> dict[str, Any]:
    work = assets["root"] / name
    return tiny_assets.axolotl_config(
        assets["model"],
        assets["data"],
        work,
        plugins=[tiny_assets.PLUGIN, tiny_assets.RECORDER],
        **overrides,
    )


# ---------------------------------------------------------------------------------------------
# tests that need no Axolotl


def test_integrations_import_without_axolotl():
    import dft_peft.integrations  # noqa: F401  (never needs Axolotl)

    if importlib.util.find_spec("axolotl") is not None:
        pytest.skip("Axolotl is installed here; the missing-Axolotl message cannot be shown")
    with pytest.raises(ImportError, match="pip install axolotl"):
        importlib.import_module("dft_peft.integrations.axolotl")


# ---------------------------------------------------------------------------------------------
# real Axolotl


@_apply(needs_axolotl)
def test_lora_first_step_loss_is_dft(assets):
    cfg = _config(assets, "lora")
    # the way users run it: `axolotl train config.yml`, through accelerate launch
    run = run_axolotl(assets["root"] / "lora", "lora", cfg, launcher=None).check()
    assert "dft-peft: training objective `dft`" in run.output

    log = run.first_step_log()
    micro = run.first_step()
    ref = reference_first_step(assets["model"], micro)
    print(f"\nlora first step: axolotl {log['loss']:.9g}  reference {ref.dft:.9g}  CE {ref.ce:.6g}")

    assert micro[0]["num_items_in_batch"] == ref.count
    assert micro[0]["model_accepts_loss_kwargs"]
    assert not any(m["has_logits"] for m in micro), "the fused path should build no full logits"
    assert log["loss"] == pytest.approx(ref.dft, rel=1e-5)
    assert sum(m["loss"] for m in micro) == pytest.approx(ref.dft, rel=1e-5)
    assert abs(log["loss"] - ref.ce) > 1.0 and ref.ce > 10 * log["loss"], "looks like plain CE"
    # dft-peft's metrics callback puts plain CE and the mean target probability beside it
    assert log["ce"] == pytest.approx(ref.ce, rel=1e-4)
    assert log["p_mean"] == pytest.approx(ref.p_mean, rel=1e-2, abs=1e-5)

    out = Path(cfg["output_dir"])
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "adapter_config.json").exists()


@_apply(needs_axolotl)
def test_sample_packing_with_gradient_accumulation(assets):
    cfg = _config(
        assets,
        "packed",
        sample_packing=True,
        sequence_len=512,
        micro_batch_size=1,
        gradient_accumulation_steps=2,
    )
    run = run_axolotl(assets["root"] / "packed", "packed", cfg).check()
    log = run.first_step_log()
    micro = run.first_step()
    assert len(micro) == 2
    for m in micro:
        positions = m["inputs"].get("position_ids")
        assert positions is not None, "sample packing should pass position_ids"
    assert max(len(_segments(m["inputs"]["position_ids"][0], 512)) for m in micro) >= 2, (
        "no row holds two sequences: the packing check would be vacuous"
    )
    ref = reference_first_step(assets["model"], micro)
    print(f"\npacked+GA2 first step: axolotl {log['loss']:.9g}  reference {ref.dft:.9g}  CE {ref.ce:.6g}")

    # each micro-batch is normalised by the whole step's token count (num_items_in_batch),
    # so the step's loss is the token mean over both micro-batches, not a mean of means
    assert all(m["num_items_in_batch"] == ref.count for m in micro)
    assert log["loss"] == pytest.approx(ref.dft, rel=1e-5)
    assert log["ce"] == pytest.approx(ref.ce, rel=1e-4)
    assert not any(m["has_logits"] for m in micro)
    assert (Path(cfg["output_dir"]) / "adapter_model.safetensors").exists()


@_apply(needs_axolotl)
def test_qlora_runs_dft(assets):
    cfg = _config(
        assets, "qlora", adapter="qlora", load_in_4bit=True,
        val_set_size=0.1, eval_strategy="steps", eval_steps=3,
    )
    run = run_axolotl(assets["root"] / "qlora", "qlora", cfg).check()
    assert "dft-peft: training objective `dft`" in run.output
    log = run.first_step_log()
    micro = run.first_step()
    ref = reference_first_step(assets["model"], micro)  # of the unquantized model
    print(f"\nqlora first step: axolotl {log['loss']:.9g}  fp32 reference {ref.dft:.9g}  CE {ref.ce:.6g}")
    # 4-bit weights move the numbers a little, CE is 500x away
    assert log["loss"] == pytest.approx(ref.dft, rel=0.05)
    assert log["ce"] == pytest.approx(ref.ce, rel=0.05)
    assert not any(m["has_logits"] for m in micro)
    assert (Path(cfg["output_dir"]) / "adapter_model.safetensors").exists()
    # evaluation reports the same objective, with dft-peft's columns beside it
    evals = [log for log in run.logs() if "eval_loss" in log]
    assert evals, run.tail()
    assert evals[-1]["eval_ce"] > 10 * evals[-1]["eval_loss"]
    assert "eval_p_mean" in evals[-1]


@_apply(needs_axolotl)
def test_unknown_loss_stops_the_run(assets):
    cfg = _config(assets, "typo", loss="dftt")
    run = run_axolotl(assets["root"] / "typo", "typo", cfg)
    assert run.returncode != 0
    assert "unknown loss `dftt`" in run.output, run.tail()
    assert "Did you mean `dft`?" in run.output
    assert "Starting trainer" not in run.output


_VALIDATION_SCRIPT = r"""
import json, sys
from axolotl.cli.config import prepare_plugins
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault

PLUGIN = "dft_peft.integrations.axolotl.DFTPlugin"
base = json.loads(sys.argv[1])
cases = json.loads(sys.argv[2])
results = {}
for name, extra in cases.items():
    if "__file__" in extra:  # a whole YAML file, as `axolotl train` would read it
        import yaml
        with open(extra["__file__"], encoding="utf-8") as f:
            cfg = DictDefault(yaml.safe_load(f))
    else:
        cfg = DictDefault({**base, **extra})
    try:
        prepare_plugins(cfg)  # runs the plugins' register() on the raw config
        out = validate_config(cfg)
        results[name] = {"ok": True, "loss": out.get("loss"), "dft_alpha": out.get("dft_alpha")}
    except Exception as exc:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print("RESULTS=" + json.dumps(results))
"""


@_apply(needs_axolotl)
def test_config_keys_and_fighting_settings(assets, tmp_path):
    plugin = tiny_assets.PLUGIN
    base = {
        "base_model": str(assets["model"]),
        "datasets": [{"path": str(assets["data"]), "type": "alpaca", "ds_type": "json"}],
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "sequence_len": 128,
        "adapter": "lora",
        "output_dir": str(tmp_path / "out"),
    }
    cases = {
        # without the plugin Axolotl's schema silently drops the unknown key: plain CE
        "no_plugin": {"loss": "dft"},
        "default": {"plugins": [plugin]},
        "sft": {"plugins": [plugin], "loss": "sft"},
        "alpha": {"plugins": [plugin], "loss": "dft", "dft_alpha": 0.5},
        "bad_alpha": {"plugins": [plugin], "dft_alpha": 2},
        "alpha_for_sft": {"plugins": [plugin], "loss": "sft", "dft_alpha": 0.5},
        "liger_flce": {"plugins": [plugin], "liger_fused_linear_cross_entropy": True},
        "liger_scaling": {"plugins": [plugin], "liger_use_token_scaling": True},
        "cce_flag": {"plugins": [plugin], "cut_cross_entropy": True},
        "cce_plugin": {
            "plugins": [plugin, "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
            "bf16": True,
        },
        "chunked": {"plugins": [plugin], "chunked_cross_entropy": True},
        "axolotl_eaft": {"plugins": [plugin], "use_eaft": True},
        "rl": {"plugins": [plugin], "rl": "dpo"},
        "asft_full_ft": {"plugins": [plugin], "loss": "asft", "adapter": None},
        "example": {"__file__": str(EXAMPLE)},
    }
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", _VALIDATION_SCRIPT, json.dumps(base), json.dumps(cases)],
        env=axolotl_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    found = re.search(r"^RESULTS=(.*)$", proc.stdout, re.M)
    assert found, proc.stdout[-4000:]
    res = json.loads(found.group(1))

    assert res["no_plugin"]["ok"] and res["no_plugin"]["loss"] is None
    assert res["default"] == {"ok": True, "loss": "dft", "dft_alpha": None}
    assert res["sft"]["ok"] and res["sft"]["loss"] == "sft"
    assert res["alpha"]["ok"] and res["alpha"]["dft_alpha"] == 0.5
    assert not res["bad_alpha"]["ok"] and "`dft_alpha`" in res["bad_alpha"]["error"]
    assert not res["alpha_for_sft"]["ok"]
    assert "`dft_alpha` is a parameter of loss `dft`" in res["alpha_for_sft"]["error"]
    assert not res["asft_full_ft"]["ok"] and "set `adapter: lora`" in res["asft_full_ft"]["error"]
    assert res["example"] == {"ok": True, "loss": "dft", "dft_alpha": None}, res["example"]
    for case, needle in {
        "liger_flce": "remove `liger_fused_linear_cross_entropy: true`",
        "liger_scaling": "remove `liger_use_token_scaling: true`",
        "cce_flag": "remove `cut_cross_entropy: true`",
        "cce_plugin": "remove `axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin`",
        "chunked": "remove `chunked_cross_entropy: true`",
        "axolotl_eaft": "set `loss: eaft` instead",
        "rl": "remove `rl: dpo`",
    }.items():
        assert not res[case]["ok"], case
        assert needle in res[case]["error"], (case, res[case]["error"])


@_apply(needs_axolotl)
def test_same_first_step_loss_as_dft_peft_train(tmp_path):
    """One YAML, two trainers: Axolotl + the plugin and `dft-peft train` agree on step 1."""
    if importlib.util.find_spec("dft_peft.train") is None or importlib.util.find_spec("dft_peft.cli") is None:
        pytest.skip("`dft-peft train` (dft_peft.train / dft_peft.cli) does not exist yet")

    model_dir = tiny_assets.build_model(tmp_path / "tiny-llama")
    # identical rows: the first batch is the same whatever order either trainer reads them in
    row = tiny_assets.alpaca_rows(1)[0]
    data = tiny_assets.write_alpaca(tmp_path / "same.jsonl", [row] * 8)
    cfg = tiny_assets.axolotl_config(model_dir, data, tmp_path / "axolotl", plugins=[tiny_assets.PLUGIN, tiny_assets.RECORDER])
    axo = run_axolotl(tmp_path / "axolotl", "axolotl", cfg).check()
    axolotl_loss = axo.first_step_log()["loss"]

    ours_cfg = {**cfg, "plugins": [tiny_assets.PLUGIN], "output_dir": str(tmp_path / "ours" / "out")}
    ours_cfg["dataset_prepared_path"] = str(tmp_path / "ours" / "prepared")
    config = tiny_assets.write_config(tmp_path / "ours.yml", ours_cfg)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from dft_peft.cli import main; sys.exit(main())", "train", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ours_loss = _first_logged_loss(Path(ours_cfg["output_dir"]), proc.stdout)
    print(f"\nfirst step: axolotl {axolotl_loss:.9g}  dft-peft train {ours_loss:.9g}")
    assert ours_loss == pytest.approx(axolotl_loss, rel=1e-4)


def _first_logged_loss(out_dir: Path, stdout: str) -> float:
    """The first step's loss from `dft-peft train`: log_history.json, trainer_state.json, a
    jsonl log, or stdout."""
    for history in sorted(out_dir.rglob("log_history.json")):
        for entry in json.loads(history.read_text()):
            if "loss" in entry and entry.get("step") == 1:
                return float(entry["loss"])
    for state in sorted(out_dir.rglob("trainer_state.json")):
        for entry in json.loads(state.read_text()).get("log_history", []):
            if "loss" in entry and entry.get("step") == 1:
                return float(entry["loss"])
    for log in sorted(out_dir.rglob("*.jsonl")):
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "loss" in entry and entry.get("step", 1) == 1:
                return float(entry["loss"])
    found = re.search(r"""['"]loss['"]:\s*['"]?([0-9.eE+-]+)""", stdout)
    assert found, f"no first-step loss found in {out_dir} or the output:\n{stdout[-3000:]}"
    return float(found.group(1))
