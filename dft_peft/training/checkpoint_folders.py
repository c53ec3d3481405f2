"""Checkpoint folders on disk: which `checkpoint-N` folders are complete, the last one to resume
from, and writing a run's output files so that each is either old or new, never half of one.
Plain file operations, used by the Trainer subclass, the run-identity checks and the launcher's
resume hint alike."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What Trainer needs to resume the exact optimizer, schedule and step.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


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
