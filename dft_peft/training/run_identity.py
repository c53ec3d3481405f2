"""Which run a folder or checkpoint belongs to, so that two runs' files never mix.

A run's identity is a hash of the config keys that change what it trains (model, adapter,
objective, data, schedule, seed...), not of those that only change where or how often it writes
(output_dir, logging and save intervals, trackers). It is written as `dft_peft_run.json` into the
output folder when a run starts and into every checkpoint it saves. Then:

* resuming checks that the checkpoint was written by the same identity, and names the keys that
  differ when it was not (resuming someone else's optimizer state under new settings gives an
  adapter that neither config describes);
* a fresh run into a folder that holds another run stops, unless `--overwrite`, which moves the
  old run aside to a timestamped sibling folder instead of deleting it;
* checkpoint rotation only deletes checkpoints of the run's own identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dft_peft.errors import UserError
from dft_peft.training.checkpoint_folders import all_checkpoints, last_checkpoint

logger = logging.getLogger("dft_peft")

RUN_FILE = "dft_peft_run.json"
# Keys that do not change the trained adapter: where and how often things are written or shown.
NOT_RESULT_KEYS = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "auto_resume_from_checkpoints", "dataset_prepared_path",
        "logging_steps", "save_steps", "saves_per_epoch", "save_total_limit", "eval_steps", "evals_per_epoch",
        "test_datasets", "report_to", "use_tensorboard", "use_wandb", "wandb_project", "wandb_entity",
        "wandb_name", "wandb_mode", "wandb_run_id", "wandb_watch", "wandb_log_model", "strict", "plugins",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "loss_watchdog_threshold",
        "loss_watchdog_patience", "fsdp_config", "fsdp_version", "memory_check",
    }
)
# Keys a resumed run may change: training longer (or shorter) continues the same run, with the
# learning-rate schedule following the new length, as the transformers Trainer does.
LENGTH_KEYS = frozenset({"max_steps", "num_epochs"})
# Files that mark a folder as holding a run's results.
_RUN_OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "dft_peft_config.yml", "trainer_state.json")


def result_keys(cfg: Any) -> dict[str, Any]:
    """The resolved config without the keys that do not change what is trained."""
    return {k: v for k, v in cfg.to_yaml_dict().items() if k not in NOT_RESULT_KEYS}


def run_record(cfg: Any) -> dict[str, Any]:
    keys = result_keys(cfg)
    text = json.dumps(keys, sort_keys=True, default=str)
    return {"identity": hashlib.sha256(text.encode()).hexdigest()[:16], "config": json.loads(text)}


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "identity" in record else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Atomically (temporary file + rename): a kill leaves the old record or the new one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, folder / RUN_FILE)


def differing_keys(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    a, b = ours.get("config", {}), theirs.get("config", {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _describe_difference(keys: list[str], ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    parts = []
    for key in keys[:4]:
        old, new = theirs.get("config", {}).get(key), ours.get("config", {}).get(key)
        parts.append(f"{key}: {_short(old)} -> {_short(new)}")
    more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    return ", ".join(parts) + more


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume(checkpoint: Path, cfg: Any) -> None:
    """The checkpoint must come from a run of the same identity; a legacy one only warns."""
    theirs = read_record(checkpoint)
    if theirs is None:
        logger.warning("%s has no %s (written before dft-peft recorded runs); its config cannot be checked.", checkpoint, RUN_FILE)
        return
    ours = run_record(cfg)
    if theirs["identity"] == ours["identity"]:
        return
    keys = differing_keys(ours, theirs)
    if set(keys) <= LENGTH_KEYS:
        logger.warning(
            "resuming %s with a new run length (%s); the learning-rate schedule follows the new length.",
            checkpoint, _describe_difference(keys, ours, theirs),
        )
        return
    raise UserError(
        f"cannot resume from {checkpoint}: it was written by a run with a different config "
        f"({_describe_difference(keys, ours, theirs)}); set those keys back to resume it, or train into a new "
        "output_dir."
    )


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` holds something a run made that could be lost: an adapter or a checkpoint.
    A marker alone (a run that failed before its first save) holds nothing; the next run may
    take the folder, so fixing an out-of-memory batch size needs no --overwrite."""
    if not folder.is_dir():
        return False
    return any((folder / f).exists() for f in _RUN_OUTPUTS) or bool(all_checkpoints(folder))


def check_output_dir(cfg: Any, *, resuming: bool, overwrite: bool = False, dry_run: bool = False) -> None:
    """A fresh run must not write into a folder that holds another run (see the module doc).

    With `overwrite` the old run is moved aside (not deleted) unless `dry_run` (validate).
    """
    folder = Path(cfg.output_dir)
    if not holds_a_run(folder):
        return
    ours = run_record(cfg)
    theirs = read_record(folder)
    if resuming and (theirs is None or set(differing_keys(ours, theirs)) <= LENGTH_KEYS):
        return  # the checkpoint itself is checked by `check_resume`
    if theirs is not None and theirs["identity"] == ours["identity"] and not overwrite:
        return  # the same run again: the same files (train() says it starts over)
    if overwrite:
        if not dry_run:
            moved = move_aside(folder)
            logger.warning("--overwrite: moved the previous run in %s to %s", folder, moved)
        return
    what = "a run with a different config" if theirs is not None else "another run's files"
    if theirs is not None:
        keys = differing_keys(ours, theirs)
        what += f" ({_describe_difference(keys, ours, theirs)})"
    raise UserError(
        f"output_dir {folder} already holds {what}; use a new output_dir, resume it "
        "(auto_resume_from_checkpoints: true with its config), or pass --overwrite to move it aside."
    )


def move_aside(folder: Path) -> Path:
    """Rename `folder` to `<folder>.old-<timestamp>` beside it; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
        n += 1
    os.replace(folder, target)
    return target


def mark_output_dir(cfg: Any) -> None:
    """Record the run's identity in its output folder before it writes anything else."""
    write_record(Path(cfg.output_dir), run_record(cfg))


def check_run_folder(cfg: Any) -> None:
    """What `train` would refuse about output_dir and the checkpoint to resume, without touching
    anything (for `validate`)."""
    resume = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    if resume is None and cfg.auto_resume_from_checkpoints:
        resume = last_checkpoint(cfg.output_dir)
    if resume is not None:
        check_resume(resume, cfg)
    check_output_dir(cfg, resuming=resume is not None, dry_run=True)
