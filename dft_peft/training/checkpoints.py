"""Checkpoints that a kill at any moment cannot corrupt, rotated among the run's own.

transformers writes `checkpoint-N/` file by file in place, so a run killed mid-save leaves a
folder that looks complete by name but lacks its optimizer state, and `resume` then crashes or,
worse, silently restarts the schedule. Here every checkpoint is written under a staging folder
and renamed into place only once complete; a folder named `checkpoint-N` is always whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import Trainer

from dft_peft.training.checkpoint_folders import complete_checkpoints
from dft_peft.training.distributed import wait_for_everyone
from dft_peft.training.divergence import check_finite_parameters
from dft_peft.training.run_identity import read_record, write_record

STAGING = ".staging"


class AtomicCheckpointTrainer(Trainer):
    """`Trainer` whose checkpoints appear atomically (staging folder + rename), each carrying the
    run's identity (`run_record`, see dft_peft/run_identity.py), never written from weights that
    are no longer finite, and rotated among the run's own checkpoints only."""

    def __init__(self, *args, run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_record = run_record

    def _save_checkpoint(self, model, trial):
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
        self._point_best_at_final_folder(run_dir, staging / name)
        if self.run_record is not None:
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

    def _point_best_at_final_folder(self, run_dir: Path, staged: Path) -> None:
        """transformers looks for the best checkpoint under the folder it saved into (staging
        here), so `best_model_checkpoint` would name a staging path that is gone after the rename,
        and `load_best_model_at_end` would find nothing. Point it at the final folder, also in the
        staged trainer_state.json (what a resumed run reads), before the rename makes it visible."""
        best_step = self.state.best_global_step
        if not best_step or not self.args.should_save:
            return
        best = run_dir / f"checkpoint-{best_step}"
        if best_step != self.state.global_step and not best.is_dir():
            return
        self.state.best_model_checkpoint = str(best)
        if (staged / "trainer_state.json").is_file():
            self.state.save_to_json(str(staged / "trainer_state.json"))


def _staging_barrier() -> None:
    """Under torchrun / accelerate launch every rank writes its own RNG state into the staging
    checkpoint while the main process writes the rest and then renames the folder; a barrier on
    each side keeps the two from crossing. Nothing in a single process."""
    wait_for_everyone()


def rotate_own_checkpoints(run_dir: Path, limit: int | None, *, identity: str | None, best: str | None = None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints of this run (`identity`); never touch another
    run's, an unfinished one, or the best model's. Returns what was deleted."""
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
