"""Stop a run whose loss or gradients are no longer finite, before anything is saved from it.

A NaN or infinite loss poisons every LoRA weight at the next optimizer step, and from then on
every loss is NaN: the run "finishes", writes an adapter full of NaN and says "done". Here the
gradients of the trainable weights are checked just before each optimizer step (one host sync
per step, over the adapter's weights only). In fp32/bf16 a non-finite gradient can only come
from a non-finite loss (or an overflow in the backward pass) and the optimizer step would make
it permanent, so the run stops there, before the step, with one line naming the step and the
likely cause; the last checkpoint and any earlier adapter stay as they were. Under fp16 the
gradient scaler skips such steps on purpose while it lowers its scale, so only a run of
`FP16_PATIENCE` skipped steps in a row counts as divergence.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from dft_peft.errors import UserError

logger = logging.getLogger("dft_peft")

# fp16's GradScaler halves its scale on each overflow from 2**16: 20 skips in a row means the
# overflow is not the scale's but the model's.
FP16_PATIENCE = 20
# Above this learning rate a LoRA run blowing up is most likely the learning rate.
HIGH_LEARNING_RATE = 1e-2


class TrainingDiverged(UserError):
    """The loss or gradients stopped being finite: one line, exit 2, nothing saved after it."""


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def check_finite_parameters(model: Any, what: str) -> None:
    """Refuse to write `what` (a checkpoint, the adapter) from weights that are not finite."""
    if not all_finite([p.detach() for p in trainable_parameters(model)]):
        raise TrainingDiverged(
            f"the adapter's weights are no longer finite (NaN or inf); {what} was not written, so the "
            "last good checkpoint and adapter are kept. Lower learning_rate, or check the data's row weights."
        )


def likely_cause(cfg: Any, *, step: int, loss: float | None, fp16: bool) -> str:
    """The most probable reason, from the config and where the run broke."""
    reasons = []
    if any(getattr(ds, "weight_field", None) for ds in getattr(cfg, "datasets", None) or []):
        reasons.append("a row weight (weight_field) too large for float32: keep weights well below 1e30")
    if fp16:
        reasons.append("fp16 overflow: use `bf16: true` on an Ampere+ GPU, or `fp16: false`")
    lr = getattr(cfg, "learning_rate", None)
    if lr is not None and (lr >= HIGH_LEARNING_RATE or step > 1):
        reasons.append(f"learning_rate {lr:g} too high for this run: lower it (LoRA usually 1e-4 to 5e-4)")
    if not reasons:
        reasons.append("a numeric problem in the model or data: try `max_grad_norm: 1.0` and a lower learning_rate")
    return "; or ".join(reasons[:2])


class DivergenceGuard(TrainerCallback):
    """Stops training (raises `TrainingDiverged`) once the gradients stay non-finite.

    The step's loss, where the patched model kept it, is named in the message; transformers'
    own log line would show it too, but the stop comes before that line is written.
    """

    def __init__(self, cfg: Any, model: Any, *, fp16: bool) -> None:
        self.cfg = cfg
        self.model = model
        self.fp16 = fp16
        self.bad_steps = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = trainable_parameters(self.model)
        grads_ok = all_finite([p.grad for p in params if p.grad is not None])
        step = state.global_step + 1
        if self.fp16:  # the scaler skips steps with inf gradients; only a long run of them is divergence
            if grads_ok:
                self.bad_steps = 0
                return
            self.bad_steps += 1
            loss = _pending_loss(self.model)
            if self.bad_steps < FP16_PATIENCE:
                logger.warning("step %d: non-finite gradient (loss %s); fp16 skips this step", step, _fmt(loss))
                return
        else:
            # fp32/bf16: a non-finite loss is divergence even when clipping kept the gradients finite
            # (a huge row weight: loss inf, gradients scaled to zero), and nothing recovers from it.
            loss = _pending_loss(self.model)
            if grads_ok and (loss is None or math.isfinite(loss)):
                return
        what = f"loss {_fmt(loss)}, gradients {'finite' if grads_ok else 'not finite'}"
        raise TrainingDiverged(
            f"training diverged at step {step} ({what}); stopped before the optimizer step, nothing saved after "
            f"step {state.global_step}. Likely cause: {likely_cause(self.cfg, step=step, loss=loss, fp16=self.fp16)}."
        )

    def on_step_end(self, args, state, control, **kwargs):
        # An fp16 step that was not skipped, or an optimizer that produced inf from finite grads.
        if not all_finite([p.detach() for p in trainable_parameters(self.model)]):
            raise TrainingDiverged(
                f"training diverged at step {state.global_step}: the adapter's weights are no longer finite; "
                f"nothing saved from it. Likely cause: {likely_cause(self.cfg, step=state.global_step, loss=None, fp16=self.fp16)}."
            )


def _pending_loss(model: Any) -> float | None:
    """The objective's mean since the last log line, read without consuming it."""
    from dft_peft.losses.patch import patch_state

    patch = patch_state(model)
    sums = getattr(getattr(patch, "train_stats", None), "_sums", None)
    if sums is None:
        return None
    total, count = float(sums[0]), float(sums[-1])
    return total / count if count > 0 else None


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g}"


def install_divergence_guard(trainer: Any, cfg: Any) -> DivergenceGuard:
    guard = DivergenceGuard(cfg, trainer.model, fp16=bool(trainer.args.fp16))
    trainer.add_callback(guard)
    return guard
