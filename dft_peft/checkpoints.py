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

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What Trainer needs to resume the exact optimizer, schedule and step.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


class AtomicCheckpointTrainer(Trainer):
    """`Trainer` whose checkpoints appear atomically (staging folder + rename), each carrying the
    run's identity (`run_record`, see dft_peft/run_identity.py), never written from weights that
    are no longer finite, and rotated among the run's own checkpoints only."""

    def __init__(self, *args, run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_record = run_record

    def _save_checkpoint(self, model, trial):
        from dft_peft.divergence import check_finite_parameters

        check_finite_parameters(self.model, f"checkpoint-{self.state.global_step}")
        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        _staging_barrier()  # no rank writes into staging before the main process has emptied it
        # Trainer builds the checkpoint path from `_get_output_dir`; point it at the staging area.
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        _staging_barrier()  # every rank's rng_state_<rank>.pth is in staging before it moves
        if not self.args.should_save:
            return
        name = f"checkpoint-{self.state.global_step}"
        if self.run_record is not None:
            from dft_peft.run_identity import write_record

            write_record(staging / name, self.run_record)
        target = run_dir / name
        if target.exists():  # the same step saved twice (e.g. last step == save step)
            shutil.rmtree(target)
        os.replace(staging / name, target)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_own_checkpoints(
            run_dir,
            self.args.save_total_limit,
            identity=(self.run_record or {}).get("identity"),
            best=self.state.best_model_checkpoint,
        )


def _staging_barrier() -> None:
    """Under torchrun / accelerate launch every rank writes its own RNG state into the staging
    checkpoint while the main process writes the rest and then renames the folder; a barrier on
    each side keeps the two from crossing. Nothing in a single process."""
    from dft_peft.distributed import wait_for_everyone

    wait_for_everyone()


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


def all_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder, complete or not, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in folder.iterdir() if (m := _CHECKPOINT.match(c.name)) and c.is_dir()]
    return [path for _, path in sorted(found)]


def rotate_own_checkpoints(run_dir: Path, limit: int | None, *, identity: str | None, best: str | None = None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints of this run (`identity`); never touch another
    run's, an unfinished one, or the best model's. Returns what was deleted."""
    from dft_peft.run_identity import read_record

    if not limit or limit <= 0:
        return []
    own = [c for c in complete_checkpoints(run_dir) if (read_record(c) or {}).get("identity") == identity]
    keep = set(own[-limit:])
    if best:
        keep.add(Path(best))
    deleted = [c for c in own if c not in keep]
    for checkpoint in deleted:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return deleted


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
