"""Checkpoints that a kill at any moment cannot corrupt, and finding the last one to resume from.

transformers writes `checkpoint-N/` file by file in place, so a run killed mid-save leaves a
folder that looks complete by name but lacks its optimizer state, and `resume` then crashes or,
worse, silently restarts the schedule. Here every checkpoint is written under a staging folder
and renamed into place only once complete; a folder named `checkpoint-N` is always whole.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What Trainer needs to resume the exact optimizer, schedule and step.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


class AtomicCheckpointTrainer(Trainer):
    """`Trainer` whose checkpoints appear atomically (staging folder + rename)."""

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        # Trainer builds the checkpoint path from `_get_output_dir`; point it at the staging area.
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if not self.args.should_save:
            return
        name = f"checkpoint-{self.state.global_step}"
        target = run_dir / name
        if target.exists():  # the same step saved twice (e.g. last step == save step)
            shutil.rmtree(target)
        os.replace(staging / name, target)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders holding everything a resume needs, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and all((child / f).is_file() for f in REQUIRED_FILES):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def write_atomically(target_dir: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)`, then move each file it wrote into `target_dir` with os.replace.

    Each output file is either the old version or the new one, never half of one.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".tmp-") as tmp:
        write(Path(tmp))
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                dest = target_dir / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
