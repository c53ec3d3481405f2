"""Put the token diagnostics of a patched model on every training and evaluation log line.

The callback reads the `TokenStats` that the fused loss filled since the last log (one host
sync per log line) and adds `ce`, `p_mean`, `token_acc` and `entropy` beside the objective, so a
DFT loss that reads 10-20x lower than CE is never mistaken for a broken run. It must run before
the progress bar and TensorBoard callbacks, hence `install_metrics_callback` puts it first.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from dft_peft.training.distributed import all_reduce_sum
from dft_peft.losses.patch import patch_state

# `objective` repeats Trainer's own `loss`; `tokens` is bookkeeping, not a metric.
_SKIP = {"objective", "tokens"}


class DFTMetricsCallback(TrainerCallback):
    """Adds the patched model's token diagnostics to `logs` (and to `state.log_history`)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        patch = patch_state(self.model)
        if patch is None or logs is None:
            return
        # Sums and counts are added over all processes before dividing (a no-op in one process):
        # on_log runs on every rank at the same step, so the reduction lines up.
        if "loss" in logs:
            stats, prefix = patch.train_stats.pop(all_reduce_sum), ""
        elif "eval_loss" in logs:
            stats, prefix = patch.eval_stats.pop(all_reduce_sum), "eval_"
        else:
            return
        extra = {f"{prefix}{k}": round(v, 6) for k, v in stats.items() if k not in _SKIP}
        logs.update(extra)
        # Trainer appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def install_metrics_callback(trainer: Any) -> DFTMetricsCallback:
    """Insert the callback first, so later callbacks (progress, TensorBoard) see its numbers."""
    callback = DFTMetricsCallback(trainer.model)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
