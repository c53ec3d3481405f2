"""`jagged_restart_steps`: Axolotl's jagged learning-rate restarts (used by ReLoRA, also alone).

Axolotl 0.19 wraps whatever schedule the Trainer built (utils/schedulers.py
`JaggedLRRestartScheduler`, installed by core/trainers/mixins/scheduler.py) and multiplies its
learning rate by a factor that, in each window of `jagged_restart_steps` steps after the first,
ramps from `min_lr_scale` up to 1 over the first `warmup` steps and back down over the last
`anneal` steps; before the first restart the factor is 1.

Axolotl's wrapper steps once when it is built (torch's LRScheduler constructor does), so the
learning rate of optimizer step s is the wrapped schedule's at s + 1 times the factor at s + 1:
the lowest rate falls on the step just before a restart and the rate after it starts one warmup
step up. dft-peft keeps that alignment, so an Axolotl config gets the same learning rates.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from dft_peft.config import Config
from dft_peft.config.relora_keys import DEFAULT_ANNEAL_STEPS, DEFAULT_WARMUP_STEPS
from dft_peft.errors import UserError

# Axolotl: `min_lr_scale=cosine_min_lr_ratio or 0.001`; dft-peft has no cosine_min_lr_ratio.
MIN_LR_SCALE = 0.001


def jagged_factor(step: int, *, restart_steps: int, warmup_steps: int, anneal_steps: int, min_lr_scale: float = MIN_LR_SCALE) -> float:
    """The multiplier at scheduler step `step` (Axolotl's `JaggedLRRestartScheduler.get_lr`)."""
    if step < restart_steps - anneal_steps:
        return 1.0
    into_window = step % restart_steps
    if into_window < warmup_steps:
        cycle = min(1.0, into_window / warmup_steps)
    elif into_window > restart_steps - anneal_steps:
        cycle = min(1.0, (restart_steps - into_window) / anneal_steps)
    else:
        cycle = 1.0
    return cycle * (1 - min_lr_scale) + min_lr_scale


def _jagged_lambda(step: int, *, inner: Any, **window: Any) -> float:
    return inner(step + 1) * jagged_factor(step + 1, **window)  # Axolotl's one step ahead (module doc)


def with_jagged_restarts(scheduler: Any, optimizer: Any, cfg: Config) -> Any:
    """A LambdaLR giving `scheduler`'s rates times the jagged factor, as Axolotl's wrapper does."""
    from torch.optim.lr_scheduler import LambdaLR

    if type(scheduler) is not LambdaLR:
        raise UserError(
            f"jagged_restart_steps: the `{cfg.lr_scheduler}` schedule ({type(scheduler).__name__}) cannot be "
            "wrapped; use lr_scheduler cosine, linear or constant."
        )
    window = dict(
        restart_steps=cfg.jagged_restart_steps,
        warmup_steps=cfg.jagged_restart_warmup_steps or DEFAULT_WARMUP_STEPS,
        anneal_steps=cfg.jagged_restart_anneal_steps or DEFAULT_ANNEAL_STEPS,
    )
    return LambdaLR(optimizer, [partial(_jagged_lambda, inner=fn, **window) for fn in scheduler.lr_lambdas])


def install_jagged_restarts(trainer: Any, cfg: Config) -> bool:
    """Wrap the schedule the Trainer creates (its own, or one installed before this) in the
    jagged restarts. Install after any other `create_scheduler` replacement."""
    if not cfg.jagged_restart_steps:
        return False
    create_inner = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        if trainer.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else trainer.optimizer
            inner = create_inner(num_training_steps, optimizer=optimizer)
            trainer.lr_scheduler = with_jagged_restarts(inner, optimizer, cfg)
            trainer._created_lr_scheduler = True  # as Trainer.create_scheduler marks its own
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    return True
