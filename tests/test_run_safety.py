"""Nothing the user had is lost: a diverging run, a reused output_dir, a resume under a changed
config. Each runs the real CLI and Trainer on the tiny local Llama (CPU, a few seconds a run)
and checks the files on disk byte for byte, not the code's own account of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from tiny_run import Interrupt, alpaca_rows, capture_trainer, config_dict, stop_at_step, write_yaml

from cli_helpers import ERROR_PREFIX, model_dir, restore_cli_state  # noqa: F401 - fixtures

from dft_peft.training.checkpoints import rotate_own_checkpoints
from dft_peft.cli import main
from dft_peft.training.run_identity import RUN_FILE, write_record


def weighted_rows(weights: list[float]) -> list[dict]:
    return [dict(row, score=w) for row, w in zip(alpaca_rows(len(weights)), weights)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(tmp_path: Path, model_dir: Path, data: Path, name: str = "run.yml", **changes) -> Path:
    cfg = config_dict(model_dir, data, tmp_path / "out", **{"micro_batch_size": 4, "max_steps": 4, "save_steps": 1, **changes})
    return write_yaml(tmp_path / name, cfg)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def one_line(err: str) -> str:
    """The one error line (a run that got as far as training also drew its progress bars on
    stderr, which tqdm redraws once more when it closes)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_PREFIX in line]
    assert len(errors) == 1 and all("it/s]" in line for line in lines if line not in errors), err
    assert "Traceback" not in err
    return errors[0][errors[0].index(ERROR_PREFIX):]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its sha256: what "untouched" means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def interrupted_run(monkeypatch, capsys, config: Path, step: int = 3) -> None:
    with monkeypatch.context() as m:
        capture_trainer(m, stop_at_step(step))
        with pytest.raises(Interrupt):
            main(["train", str(config)])
    capsys.readouterr()


# ----------------------------------------------------------------------------- divergence


def test_diverging_run_stops_with_one_line_and_keeps_the_last_checkpoints(model_dir, tmp_path, monkeypatch, capsys):
    data = write_rows(tmp_path / "data.jsonl", weighted_rows([1.0] * 4))
    config = run_config(tmp_path, model_dir, data, auto_resume_from_checkpoints=True,
                        datasets=[{"path": str(data), "type": "alpaca", "weight_field": "score"}])
    interrupted_run(monkeypatch, capsys, config)  # killed in step 3: checkpoint-1 and -2 on disk
    out = tmp_path / "out"
    before = snapshot(out)
    assert {"checkpoint-1/adapter_model.safetensors", "checkpoint-2/optimizer.pt"} <= set(before)

    # The same run resumed on data where one row's weight is finite but far too large (1e38): the
    # loss is still finite (divided by the token count), its gradients overflow float32 in step 3.
    write_rows(data, weighted_rows([1.0, 1e38, 1.0, 1.0]))
    code, err = run_cli(capsys, "train", config)

    assert code == 2
    line = one_line(err)
    assert "diverged at step 3" in line and "not finite" in line, line
    assert "weight_field" in line  # the likely cause
    assert snapshot(out) == before  # checkpoints byte for byte as they were, nothing added
    assert not (out / "checkpoint-3").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_non_finite_loss_is_logged_as_such_and_never_saved(model_dir, tmp_path, monkeypatch, capsys):
    """Without the guard (as in a plain Trainer loop) transformers logged a NaN/inf loss as the mean
    of the earlier ones (0 at the first line), and the NaN adapter was saved; now the log says
    nan and the save refuses. learning_rate 1e30 blows the weights up in step 1, step 2 is NaN."""
    import dft_peft.train as train_module

    monkeypatch.setattr(train_module, "install_divergence_guard", lambda trainer, cfg: None)
    seen = capture_trainer(monkeypatch)
    data = write_rows(tmp_path / "data.jsonl", alpaca_rows(4))
    config = run_config(tmp_path, model_dir, data, max_steps=3, save_steps=1000, learning_rate=1e30)
    code, err = run_cli(capsys, "train", config)

    logged = [h["loss"] for h in seen[0].state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 3 and math.isfinite(logged[0]) and not math.isfinite(logged[-1]), logged
    assert code == 2 and "no longer finite" in one_line(err)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- reused output_dir


def test_a_fresh_run_into_another_runs_folder_stops_and_overwrite_moves_it_aside(model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "data.jsonl", alpaca_rows(4))
    first = run_config(tmp_path, model_dir, data, "a.yml", max_steps=2)
    assert run_cli(capsys, "train", first)[0] == 0
    out = tmp_path / "out"
    run_a = snapshot(out)
    assert "adapter_model.safetensors" in run_a and "checkpoint-2/" + RUN_FILE in run_a

    second = run_config(tmp_path, model_dir, data, "b.yml", max_steps=2, learning_rate=5e-3)
    for command in ("validate", "train"):  # validate says what train would refuse
        code, err = run_cli(capsys, command, second)
        line = one_line(err)
        assert code == 2 and str(out) in line and "learning_rate: 0.01 -> 0.005" in line and "--overwrite" in line, line
    assert snapshot(out) == run_a

    code, err = run_cli(capsys, "train", second, "--overwrite")
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == run_a  # the old run, whole, beside the new one
    assert json.loads((out / RUN_FILE).read_text())["config"]["learning_rate"] == 5e-3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_files_of_an_unrecorded_run_also_stop_a_fresh_run(model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "data.jsonl", alpaca_rows(4))
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)  # e.g. written by an older version
    code, err = run_cli(capsys, "validate", run_config(tmp_path, model_dir, data))
    assert code == 2 and "another run's files" in one_line(err)


def test_resume_under_a_changed_config_names_the_keys(model_dir, tmp_path, monkeypatch, capsys):
    data = write_rows(tmp_path / "data.jsonl", alpaca_rows(4))
    config = run_config(tmp_path, model_dir, data, auto_resume_from_checkpoints=True)
    interrupted_run(monkeypatch, capsys, config)
    out = tmp_path / "out"
    before = snapshot(out)

    changed = run_config(tmp_path, model_dir, data, "changed.yml", auto_resume_from_checkpoints=True, lora_r=4, loss="sft")
    code, err = run_cli(capsys, "train", changed)
    line = one_line(err)
    assert code == 2 and "checkpoint-2" in line and "lora_r: 8 -> 4" in line and 'loss: "dft" -> "sft"' in line, line
    assert snapshot(out) == before

    # The unchanged config resumes (only logging/saving keys and the run's length may differ):
    # training longer continues the same run.
    longer = run_config(tmp_path, model_dir, data, "same.yml", auto_resume_from_checkpoints=True, logging_steps=2, max_steps=5)
    code, err = run_cli(capsys, "train", longer)
    assert code == 0, err
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5


def test_rotation_never_deletes_another_runs_checkpoints(tmp_path):
    def checkpoint(step: int, identity: str | None) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_text("x")
        if identity:
            write_record(folder, {"identity": identity, "config": {}})
        return folder

    foreign = [checkpoint(1, "other"), checkpoint(2, None)]
    own = [checkpoint(3, "mine"), checkpoint(4, "mine"), checkpoint(5, "mine")]
    deleted = rotate_own_checkpoints(tmp_path, 1, identity="mine")
    assert deleted == own[:2]
    assert all(f.exists() for f in foreign) and own[2].exists()


def test_a_run_that_saved_nothing_does_not_block_the_next(model_dir, tmp_path, monkeypatch, capsys):
    """Killed before its first checkpoint (say out of memory): the fixed config may reuse the folder."""
    data = write_rows(tmp_path / "data.jsonl", alpaca_rows(4))
    interrupted_run(monkeypatch, capsys, run_config(tmp_path, model_dir, data, save_steps=1000), step=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [RUN_FILE]
    code, err = run_cli(capsys, "validate", run_config(tmp_path, model_dir, data, "fixed.yml", micro_batch_size=2))
    assert code == 0, err
