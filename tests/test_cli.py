"""`dft-peft` on the command line: bad input is one line on stderr and exit code 2 (a traceback
only with --debug); `validate` tells what a run would do; `train` takes --key=value overrides.

Most cases call `dft_peft.cli` in-process (fast); a few run the installed `dft-peft`
script in a subprocess, where stderr and the exit code are exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import alpaca_rows, config_dict, losses, write_jsonl, write_yaml

from cli_helpers import ERROR_PREFIX, model_dir, restore_cli_state  # noqa: F401 - fixtures

from dft_peft.cli.commands import EXIT_BAD_INPUT, main


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", alpaca_rows(8))


@pytest.fixture
def config_file(model_dir, data, tmp_path):
    """A working config; `config_file(**changes)` writes a variant (None removes a key)."""

    def write(name="run.yml", **changes):
        cfg = config_dict(model_dir, data, tmp_path / "out")
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        return write_yaml(tmp_path / name, cfg)

    return write


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    assert "Traceback" not in err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ----------------------------------------------------------------------------- bad input


def _row_missing_output(tmp_path):
    rows = alpaca_rows(4)
    del rows[2]["output"]
    return write_jsonl(tmp_path / "bad_rows.jsonl", rows)


BAD_INPUTS = {
    # name: (changes to the working config, text the error line must contain)
    "typo": (dict(learning_rate=None, lerning_rate=1e-3), ["`lerning_rate`", "Did you mean `learning_rate`?"]),
    "unknown_loss": (dict(loss="dtf"), ["`dtf`", "Did you mean `dft`?"]),
    "alpha_out_of_range": (dict(dft_alpha=1.5), ["dft_alpha", "1.5"]),
    "unsupported_axolotl_key": (dict(lisa_n_layers=4), ["`lisa_n_layers`", "does not support"]),
    "uncached_hub_id": (
        dict(base_model="nobody-here/tiny-model-not-in-cache"),
        ["nobody-here/tiny-model-not-in-cache", "HF_HUB_OFFLINE=1", "Hugging Face cache"],  # tests run offline
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_config_is_one_line_and_exit_2(case, config_file, capsys):
    changes, needles = BAD_INPUTS[case]
    path = config_file(**changes)
    code, out, err = run_main(capsys, "train", path)
    assert code == EXIT_BAD_INPUT == 2
    line = assert_one_error_line(err, *needles)
    if case != "uncached_hub_id":
        assert path.name in line  # config errors name the file
    assert not (path.parent / "out").exists()  # failed before anything was written


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope" / "config.yml"
    code, _, err = run_main(capsys, "train", missing)
    assert code == 2
    assert_one_error_line(err, str(missing), "not found")


def test_missing_dataset_file_names_the_path(config_file, tmp_path, capsys):
    missing = tmp_path / "data" / "missing.jsonl"
    path = config_file(datasets=[{"path": str(missing), "type": "alpaca"}])
    code, _, err = run_main(capsys, "train", path)
    assert code == 2
    assert_one_error_line(err, str(missing), "does not exist")


def test_row_missing_its_field_names_file_row_and_field(config_file, tmp_path, capsys):
    bad = _row_missing_output(tmp_path)
    path = config_file(datasets=[{"path": str(bad), "type": "alpaca"}])
    code, _, err = run_main(capsys, "train", path)
    assert code == 2
    assert_one_error_line(err, str(bad), "row 3", "'output'")  # rows count from 1, like lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a CUDA machine")
def test_fp16_on_cpu(config_file, capsys):
    code, _, err = run_main(capsys, "train", config_file(fp16=True))
    assert code == 2
    assert_one_error_line(err, "fp16", "CUDA")


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_shows_the_traceback(config_file, capsys, where):
    path = config_file(loss="dtf")
    argv = ["train", str(path), "--debug"] if where == "after" else ["--debug", "train", str(path)]
    code, _, err = run_main(capsys, *argv)
    assert code == 2  # the same exit code as without --debug (issue 11), with the traceback first
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith(ERROR_PREFIX) and "Did you mean `dft`" in err


def test_override_with_unknown_key(config_file, capsys):
    code, _, err = run_main(capsys, "validate", config_file(), "--lerning_rate=1e-3")
    assert code == 2
    assert_one_error_line(err, "--lerning_rate", "Did you mean `learning_rate`?")


# ----------------------------------------------------------------------------- the real script


def _script() -> str:
    found = Path(sys.executable).with_name("dft-peft")
    if found.is_file():
        return str(found)
    which = shutil.which("dft-peft")
    if which is None:
        pytest.skip("the dft-peft console script is not installed (pip install -e .)")
    return which


def _run_script(*argv, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(
        [_script(), *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_script_bad_row_is_one_stderr_line_and_exit_2(config_file, tmp_path):
    bad = _row_missing_output(tmp_path)
    path = config_file(datasets=[{"path": str(bad), "type": "alpaca"}])
    proc = _run_script("train", path, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, str(bad), "row 3", "'output'")
    assert proc.stdout == ""


def test_script_debug_prints_the_traceback(config_file, tmp_path):
    path = config_file(learning_rate=None, lerning_rate=1e-3)
    plain = _run_script("validate", path, cwd=tmp_path)
    assert plain.returncode == 2
    assert_one_error_line(plain.stderr, "Did you mean `learning_rate`?")
    debug = _run_script("--debug", "validate", path, cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "Did you mean `learning_rate`?" in debug.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- validate and train


# LoRA r=8 on every linear of the tiny Llama (hidden 64, 4 heads of 16, 2 KV heads, MLP 128):
# r * (in + out) per module, 2 layers.
_PER_LAYER = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128), "down": (128, 64)}
TRAINABLE = 2 * sum(8 * (i + o) for i, o in _PER_LAYER.values())


@pytest.mark.parametrize("form", [["--max_steps=2"], ["--max_steps", "2"]])
def test_validate_prints_trainable_parameters_and_steps(config_file, capsys, form):
    path = config_file()  # max_steps: 4 in the file
    code, out, err = run_main(capsys, "validate", path, *form)
    assert code == 0, err
    assert f"trainable parameters {TRAINABLE:,} of " in out
    assert "optimizer steps: 2 (" in out  # the override won
    assert "max_steps 2" in out
    assert "8 train examples" in out  # 8 rows, all shorter than sequence_len
    assert not (path.parent / "out").exists()  # validate trains nothing


def test_train_from_the_command_line_with_overrides(config_file, capsys, tmp_path):
    path = config_file()
    out_dir = tmp_path / "cli-out"
    code, out, err = run_main(capsys, "train", path, "--max_steps", "2", f"--output_dir={out_dir}", "--loss=sft")
    assert code == 0, err
    assert f"done: 2 steps; adapter saved to {out_dir}" in out
    history = json.loads((out_dir / "log_history.json").read_text())
    assert len(losses(history)) == 2 and all("ce" in h for h in history if "loss" in h and "train_runtime" not in h)
    saved = (out_dir / "dft_peft_config.yml").read_text()
    assert "loss: sft" in saved and "max_steps: 2" in saved
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out").exists()  # the output_dir override replaced the file's
