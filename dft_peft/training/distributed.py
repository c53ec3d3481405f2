"""Which process am I, and the few moments the processes of one run must agree.

dft-peft writes no launcher and no communication layer: `torchrun` / `accelerate launch` start
the processes, accelerate (through the transformers Trainer) sets up the process group and does
DDP / FSDP. What is left to us is small and lives here:

* rank / world size, read from the launcher's environment before any process group exists
  (data preparation runs before the Trainer is built);
* the main process prepares the dataset first and the others then read its cache, instead of N
  processes tokenizing the same files at once;
* the main process alone logs, writes outputs and moves checkpoints into place;
* the diagnostics' sums and counts are added over all ranks before they are divided, so a logged
  `ce` or `p_mean` is the global batch's, not rank 0's.

Every helper is a no-op in a single process, so the single-device path is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dft_peft.config.fsdp import FSDP_KEYS
from dft_peft.errors import UserError
from dft_peft.training.checkpoint_folders import last_checkpoint

logger = logging.getLogger("dft_peft")

# Where the prepared dataset goes when a distributed run names no dataset_prepared_path: the
# same folder `dft-peft preprocess` uses, so a later run (or a resume) reuses it.
SHARED_PREPARED_DIR = "prepared"


def world_size() -> int:
    """Processes in this run: the process group's size, else the launcher's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def _state() -> Any:
    """accelerate's process state; creating it joins the process group the launcher set up.

    Built with the arguments transformers' TrainingArguments uses (`cpu=` without CUDA), so the
    Trainer later finds the same process group rather than a second one.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process, then on the others (accelerate's barrier pair).

    Around data preparation this makes the main process tokenize and write the prepared-data
    cache while the others wait, and then read it. If the main process fails inside the block,
    the others stay at the barrier until the launcher ends them (torchrun does so at once).
    """
    if not is_distributed():
        yield
        return
    with _state().main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier across all processes of the run (nothing in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all ranks (a copy; the input itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1):
        return values
    backend = torch.distributed.get_backend()
    # NCCL reduces CUDA tensors only; gloo reduces CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    out = values.detach().to(device=device, copy=True)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(values.device)


def setup_process(cfg: Any) -> None:
    """What each process of a multi-process run does first (nothing in a single process):
    refuse an FSDP request that would not shard, join the process group (accelerate then also
    makes this rank's GPU the current device, so the model loads onto it, not onto GPU 0), log
    from the main process only, and say why in one line when the launcher stops us."""
    fsdp_arguments(cfg.fsdp_config, cfg.fsdp_version)  # raises early, before data and model
    if not is_distributed():
        return
    output_dir = cfg.output_dir
    _state()
    if not is_main_process():
        logging.getLogger("dft_peft").setLevel(logging.WARNING)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    _say_why_on_sigterm(output_dir)


def _resume_hint(output_dir: str) -> str:
    found = last_checkpoint(output_dir)
    where = f"the last complete checkpoint is {found}" if found else "no checkpoint was complete yet"
    return f"{where}: rerun the same command with auto_resume_from_checkpoints: true to continue from it"


def _say_why_on_sigterm(output_dir: str) -> None:
    """torchrun (and accelerate launch, which runs it) sends SIGTERM to every surviving process
    once one of them dies; by default they vanish without a word. The main process says why, and
    how to go on, in one line; the others end quietly. Checkpoints are atomic, so exiting at once
    loses nothing that was saved."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        if is_main_process() and not _REPORTED:
            print(
                f"\ndft-peft: error: rank {rank()} was stopped by the launcher (another process of this run "
                f"ended, or the job was cancelled; the launcher's report names it); {_resume_hint(output_dir)}",
                file=sys.stderr,
                flush=True,
            )
        sys.stdout.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def shared_prepared_path(prepared_path: str | None, output_dir: str) -> str | None:
    """The prepared-data folder all processes read: the configured one, or, when several
    processes run and none is configured, `output_dir/prepared` (built once by the main
    process, read by the others)."""
    if prepared_path or not is_distributed():
        return prepared_path
    path = str(Path(output_dir) / SHARED_PREPARED_DIR)
    if is_main_process():
        logger.info("%d processes: the prepared dataset is built once, in %s", world_size(), path)
    return path


# What a collective raises on the surviving ranks when a peer process died (gloo, NCCL).
_PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "gloo/transport",
    "NCCL communicator was aborted",
    "NCCL error",
)


def is_peer_failure(exc: BaseException) -> bool:
    """True when `exc` is a collective failing because another process of the run is gone."""
    if not is_distributed() or not isinstance(exc, RuntimeError):
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(exc, dist_error) or any(s in str(exc) for s in _PEER_LOST)


@contextlib.contextmanager
def exit_cleanly_on_peer_failure(output_dir: str) -> Iterator[None]:
    """Turn a dead peer's collective error into one line that says what happened and how to go on.

    When a rank is killed (the OOM killer, a preempted node, Ctrl-C on one process), the others
    fail in their next all-reduce within a second; torchrun then ends them all and prints its own
    report naming the rank that died. Without this, each survivor adds a 40-line traceback from
    inside autograd that says nothing about resuming.
    """
    try:
        yield
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        _exit_reporting(
            f"rank {rank()}: another process of this run stopped (killed or crashed; the launcher's "
            f"report names it); {_resume_hint(output_dir)}"
        )


_REPORTED = False


def _exit_reporting(message: str) -> None:
    """Print `message` (main process only) as the run's one error line and exit at once.

    The launcher's SIGTERM can arrive at any moment now; blocking it first means the line is
    printed exactly once, here or by the SIGTERM handler, never by both. `os._exit`, not an
    exception: with a peer gone, exit-time hooks that talk to the process group would block.
    """
    import signal
    import sys

    global _REPORTED
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _REPORTED = True
    if is_main_process():
        # A newline first: a progress bar may hold the line, without one of its own.
        print(f"\ndft-peft: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


# ----------------------------------------------------------------------------- FSDP2

def fsdp_arguments(fsdp_config: dict[str, Any] | None, fsdp_version: int | None) -> dict[str, Any]:
    """TrainingArguments' `fsdp` / `fsdp_config` for the config's FSDP block ({} without one).

    accelerate (1.15) shards only on CUDA-like devices: on a CPU run it quietly trains DDP with
    the whole model on every process, so a CPU run that asks for FSDP is refused rather than
    left to look sharded when it is not. The LM head stays in the root FSDP unit, which gathers
    it once per forward: the fused loss sees a whole [vocab, hidden] weight for one micro-batch
    and takes every head gradient inside that forward (nothing of the head is kept for backward).
    """
    if not fsdp_config and not fsdp_version:
        return {}
    if fsdp_version is not None and fsdp_version != 2:
        raise UserError(f"fsdp_version: {fsdp_version} is not supported; use fsdp_version: 2 (FSDP2)")
    if not torch.cuda.is_available():
        raise UserError(
            "fsdp_config: FSDP through accelerate needs CUDA GPUs (on CPU accelerate would train "
            "unsharded DDP); remove fsdp_config / fsdp_version to train data-parallel here"
        )
    settings = {FSDP_KEYS[k]: v for k, v in (fsdp_config or {}).items()}
    settings["version"] = 2
    if isinstance(settings.get("transformer_layer_cls_to_wrap"), str):
        settings["transformer_layer_cls_to_wrap"] = [settings["transformer_layer_cls_to_wrap"]]
    return {"fsdp": True, "fsdp_config": settings}


def uses_fsdp(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def adapter_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole (unsharded) state dict, gathered on every rank (a collective), for
    the main process to save; None without FSDP, where `save_pretrained` reads the model."""
    if not uses_fsdp(trainer):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)
