"""Objectives, the fused linear-head loss and the model patch."""

# Importing `objectives` registers the built-in objectives (sft, dft, ...) in the registry.
from dft_peft.losses import objectives  # noqa: F401
from dft_peft.losses.from_logits import compute_loss_func, loss_from_logits
from dft_peft.losses.fused import fused_linear_loss
from dft_peft.losses.patch import patch_model, patch_state, unpatch_model
from dft_peft.losses.registry import (
    available_losses,
    get_loss,
    loss_param_names,
    register_loss,
    validate_loss_params,
)
from dft_peft.losses.stats import TokenStats

__all__ = [
    "TokenStats",
    "available_losses",
    "compute_loss_func",
    "fused_linear_loss",
    "get_loss",
    "loss_from_logits",
    "loss_param_names",
    "patch_model",
    "patch_state",
    "register_loss",
    "unpatch_model",
    "validate_loss_params",
]
