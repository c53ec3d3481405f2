"""Axolotl's loss watchdog: stop a run whose logged loss stays above a threshold.

`loss_watchdog_threshold: 5.0` with `loss_watchdog_patience: 3` (Axolotl's default patience)
stops training after three logged losses in a row above 5.0, as Axolotl's LossWatchDogCallback
does: a diverging run ends early instead of burning the rest of its budget. The last checkpoint
and the outputs are still written, and the reason is logged in one line. (Non-finite losses are
a separate check in train.py.)
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("dft_peft")

DEFAULT_PATIENCE = 3


class LossWatchdog(TrainerCallback):
    """Counts consecutive logged losses above `threshold`; `patience` of them stop training."""

    def __init__(self, threshold: float, patience: int | None = None):
        self.threshold = float(threshold)
        self.patience = patience or DEFAULT_PATIENCE
        self.violations = 0
        self.stopped_at: int | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
        loss = (logs or {}).get("loss")
        if loss is None:
            return control
        if loss > self.threshold:
            self.violations += 1
            if self.violations >= self.patience and self.stopped_at is None:
                self.stopped_at = state.global_step
                logger.warning(
                    "loss %.4g stayed above loss_watchdog_threshold %g for %d logged steps; "
                    "stopping at step %d",
                    loss,
                    self.threshold,
                    self.violations,
                    state.global_step,
                )
                control.should_training_stop = True
        else:
            self.violations = 0
        return control


def install_loss_watchdog(trainer: Any, cfg: Any) -> LossWatchdog | None:
    """Add the watchdog when the config sets `loss_watchdog_threshold`."""
    if cfg.loss_watchdog_threshold is None:
        return None
    watchdog = LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience)
    trainer.add_callback(watchdog)
    return watchdog
