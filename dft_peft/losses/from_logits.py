"""The same objectives for code that already holds full logits.

`compute_loss_func("dft")` plugs into `transformers.Trainer(compute_loss_func=...)` for people
who keep the model's own logits (a custom head, a model we cannot patch). The logits already
exist, so nothing is saved on them, but the fp32 work is still done a chunk of rows at a time and
the only extra tensor kept for backward is the gradient the naive path would allocate anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dft_peft.losses.fused import (
    Plan,
    _normalise,
    chunk_loss_and_grad,
    compute_dtype,
    make_plan,
    shifted_valid_rows,
)


class _LogitsLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_2d, rows, targets, plan: Plan):
        want_grad = ctx.needs_input_grad[0]
        cdtype = compute_dtype(logits_2d.dtype)
        grad = torch.zeros_like(logits_2d) if want_grad else None
        total = torch.zeros((), dtype=cdtype, device=logits_2d.device)
        step = plan.rows_per_chunk(logits_2d.shape[-1], rows.numel(), logits_2d.device.type)
        with torch.autocast(logits_2d.device.type, enabled=False):
            for start in range(0, rows.numel(), step):
                idx = rows[start : start + step]
                raw = logits_2d.index_select(0, idx).to(cdtype)
                loss_sum, g = chunk_loss_and_grad(
                    raw, targets[start : start + step], None, plan, want_grad, {}
                )
                total += loss_sum
                if g is not None:
                    grad.index_copy_(0, idx, g.to(grad.dtype))
                del raw, g  # free this chunk before the next one is allocated
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "dft",
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift: bool = True,
    **loss_kwargs: Any,
) -> torch.Tensor:
    """The objective from full logits `[..., T, V]` and Hugging Face labels `[..., T]`."""
    plan = make_plan(loss, loss_kwargs)
    labels = labels.to(logits.device)
    rows, targets = shifted_valid_rows(labels, ignore_index, shift)
    logits_2d = logits.reshape(-1, logits.shape[-1])
    total = _LogitsLossFn.apply(logits_2d, rows, targets, plan)
    return _normalise(total, torch.tensor(rows.numel()), num_items_in_batch)


def compute_loss_func(loss: str = "dft", **loss_kwargs: Any) -> Callable[..., torch.Tensor]:
    """A `Trainer(compute_loss_func=...)` callable: `fn(outputs, labels, num_items_in_batch=None)`.

    The objective and its parameters are validated here, once, not at every step.
    """
    make_plan(loss, loss_kwargs)

    def trainer_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        return loss_from_logits(
            logits, labels, loss, num_items_in_batch=num_items_in_batch, **loss_kwargs
        )

    trainer_loss.__name__ = f"{loss}_loss"
    return trainer_loss
