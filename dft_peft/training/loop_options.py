"""Axolotl's training-loop keys as the Trainer takes them: eval batch size, early stopping and the
best checkpoint, torch.compile, DeepSpeed, DDP's unused-parameter search, the quadratic warmup.

Each follows Axolotl 0.19's trainer builder (src/axolotl/core/builders/base.py and causal.py) and
its scheduler mixin (core/trainers/mixins/scheduler.py, utils/schedulers.py); the config-time
rules for the same keys are in `dft_peft/config/loop_keys.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from functools import partial
from typing import Any

import torch

from dft_peft.config import Config
from dft_peft.config.loop_keys import steps_divide
from dft_peft.errors import UserError

logger = logging.getLogger("dft_peft")

# Axolotl's `torch_compile: auto` (schemas/config.py check_torch_compile_auto): on from this torch.
COMPILE_AUTO_MIN_TORCH = (2, 5, 1)


def loop_arguments(cfg: Config, *, save_steps: float | None, eval_steps: float | None, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments keywords for the loop keys; `save_steps` / `eval_steps` are the intervals
    the run uses (None: once per epoch)."""
    out: dict[str, Any] = {
        # Axolotl: eval_batch_size, default micro_batch_size (utils/config normalize_config).
        "per_device_eval_batch_size": cfg.eval_batch_size or cfg.micro_batch_size,
        # Every LoRA weight takes part in every forward, so by default DDP need not search the
        # graph for unused ones; a config that says otherwise is passed through, as in Axolotl.
        "ddp_find_unused_parameters": bool(cfg.ddp_find_unused_parameters),
    }
    if cfg.load_best_model_at_end or cfg.early_stopping_patience:
        _check_best_model_schedule(cfg, save_steps, eval_steps, has_eval)
        out["load_best_model_at_end"] = True
    if cfg.metric_for_best_model:
        out["metric_for_best_model"] = cfg.metric_for_best_model
    if cfg.greater_is_better:  # Axolotl passes it only when true; false is transformers' default for a loss
        out["greater_is_better"] = True
    out.update(compile_arguments(cfg))
    out.update(deepspeed_arguments(cfg))
    return out


def _check_best_model_schedule(cfg: Config, save_steps: float | None, eval_steps: float | None, has_eval: bool) -> None:
    """The run's own intervals (per-epoch counts turned into steps) must let the best checkpoint
    be kept: transformers would otherwise refuse in several lines, or EarlyStoppingCallback assert."""
    key = "early_stopping_patience" if cfg.early_stopping_patience else "load_best_model_at_end"
    if not has_eval:
        raise UserError(f"{key}: the evaluation split came out empty; raise `val_set_size` or use `test_datasets`.")
    if (save_steps is None) != (eval_steps is None):
        raise UserError(
            f"{key}: checkpoints and evaluations run on different schedules; set both save_steps and eval_steps "
            "(save_steps a multiple of eval_steps), or neither."
        )
    if save_steps is not None and eval_steps is not None and not steps_divide(save_steps, eval_steps):
        raise UserError(
            f"{key}: checkpoints every {save_steps} steps do not fall on evaluations every {eval_steps} steps "
            "(from saves_per_epoch / evals_per_epoch); set save_steps to a multiple of eval_steps."
        )


def compile_enabled(setting: bool | str | None) -> bool:
    """`torch_compile` resolved: `auto` is on for torch >= 2.5.1, as in Axolotl."""
    if setting == "auto":
        release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:3] if p.isdigit())
        return release >= COMPILE_AUTO_MIN_TORCH
    return bool(setting)


def compile_arguments(cfg: Config) -> dict[str, Any]:
    """Axolotl's `_configure_torch_compile`: backend and mode only travel with `torch_compile` on
    (TrainingArguments would turn compiling on by itself for either of them)."""
    if not compile_enabled(cfg.torch_compile):
        return {}
    out: dict[str, Any] = {"torch_compile": True}
    if cfg.torch_compile_backend:
        out["torch_compile_backend"] = cfg.torch_compile_backend
    if cfg.torch_compile_mode:
        out["torch_compile_mode"] = cfg.torch_compile_mode
    return out


def deepspeed_arguments(cfg: Config) -> dict[str, Any]:
    """`deepspeed:` passed through (the config checked the file and its ZeRO stage); DeepSpeed
    itself is needed only now, when a run starts."""
    if not cfg.deepspeed:
        return {}
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(deepspeed_missing(cfg))
    return {"deepspeed": cfg.deepspeed}


def deepspeed_missing(cfg: Config) -> str:
    where = f"`{cfg.deepspeed}`" if isinstance(cfg.deepspeed, str) else "a DeepSpeed config"
    return f"deepspeed: {where} needs DeepSpeed, which is not installed here: pip install deepspeed (or remove `deepspeed:`)."


# ----------------------------------------------------------------------------- callbacks


def install_early_stopping(trainer: Any, cfg: Config) -> Any | None:
    """transformers' EarlyStoppingCallback with Axolotl's one argument, the patience."""
    if not cfg.early_stopping_patience:
        return None
    from transformers import EarlyStoppingCallback

    callback = EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)
    trainer.add_callback(callback)
    return callback


def quadratic_warmup_factor(step: int, *, warmup_steps: int, total_steps: int, num_cycles: float = 0.5) -> float:
    """Axolotl's `get_cosine_schedule_with_quadratic_warmup` multiplier: (step / warmup)^2 during
    warmup, then the usual half cosine down to 0."""
    if step < warmup_steps:
        return (float(step) / float(max(1, warmup_steps))) ** 2
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def install_quadratic_warmup(trainer: Any, cfg: Config) -> bool:
    """`lr_quadratic_warmup: true` with the cosine schedule: the Trainer builds Axolotl's schedule
    instead of its own (only when no scheduler exists yet, as Axolotl's mixin does)."""
    if not cfg.lr_quadratic_warmup or cfg.lr_scheduler != "cosine":
        return False
    from torch.optim.lr_scheduler import LambdaLR

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        if trainer.lr_scheduler is None:
            factor = partial(
                quadratic_warmup_factor,
                warmup_steps=trainer.args.get_warmup_steps(num_training_steps),
                total_steps=num_training_steps,
            )
            trainer.lr_scheduler = LambdaLR(optimizer if optimizer is not None else trainer.optimizer, factor)
            trainer._created_lr_scheduler = True  # as Trainer.create_scheduler marks its own
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    return True
