"""Whose folder is `output_dir`: never another run's, resumed only from this run's own complete
checkpoint, claimed before loading and taken (marked, an old run moved aside) right before the
first step, so that a run that fails while loading leaves nothing behind."""

from __future__ import annotations

import logging
from pathlib import Path

from dft_peft.config import Config
from dft_peft.config.checks import check_paths
from dft_peft.errors import UserError
from dft_peft.training import distributed
from dft_peft.training.checkpoint_folders import last_checkpoint
from dft_peft.training.run_identity import check_output_dir, check_resume, mark_output_dir

logger = logging.getLogger("dft_peft")


def claim_output_dir(cfg: Config, *, overwrite: bool = False) -> str | None:
    """The checkpoint to resume (checked to be this run's), after making sure output_dir holds no
    other run (or, with `overwrite`, that one may be moved aside); nothing is written yet."""
    check_paths(cfg)
    if overwrite and cfg.resume_from_checkpoint:
        raise UserError("--overwrite starts a new run, resume_from_checkpoint continues one; drop one of them.")
    resume = None if overwrite else checkpoint_to_resume(cfg)
    if resume:
        check_resume(Path(resume), cfg)
    check_output_dir(cfg, resuming=resume is not None, overwrite=overwrite, dry_run=True)
    return resume


def take_output_dir(cfg: Config, *, overwrite: bool = False) -> None:
    """Right before the first step: move an old run aside (`--overwrite`) and mark the folder as
    this run's. Not earlier, so a run that fails while loading leaves no folder behind."""
    if distributed.is_main_process():
        if overwrite:
            check_output_dir(cfg, resuming=False, overwrite=True)
        mark_output_dir(cfg)
    distributed.wait_for_everyone()


def checkpoint_to_resume(cfg: Config) -> str | None:
    """`resume_from_checkpoint` (must exist) or, with `auto_resume_from_checkpoints`, the last
    complete checkpoint in output_dir."""
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise UserError(
                f"resume_from_checkpoint `{path}` is not a complete checkpoint (no trainer_state.json); "
                "point it at an output_dir/checkpoint-N folder."
            )
        return str(path)
    found = last_checkpoint(cfg.output_dir)
    if cfg.auto_resume_from_checkpoints:
        return str(found) if found else None
    if found:
        logger.warning(
            "%s already holds %s; starting over. Set auto_resume_from_checkpoints: true to continue it.",
            cfg.output_dir,
            found.name,
        )
    return None
