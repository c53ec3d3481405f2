"""The config as transformers `TrainingArguments`: schedule, precision, checkpoints, evaluation,
reporting, optimizer names, and the distributed settings that keep the objective exact."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from dft_peft.config import Config
from dft_peft.errors import UserError
from dft_peft.model.loading import Precision
from dft_peft.training import distributed
from dft_peft.training.loop_options import deepspeed_missing, loop_arguments

logger = logging.getLogger("dft_peft")


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    return max(1, math.ceil(train_rows / (cfg.micro_batch_size * cfg.gradient_accumulation_steps)))


def _per_epoch(count: int | None, epoch_steps: int) -> int | None:
    """Axolotl's saves_per_epoch / evals_per_epoch as a step interval."""
    return None if not count else max(1, epoch_steps // count)


def training_arguments(cfg: Config, precision: Precision, epoch_steps: int, *, has_eval: bool):
    from transformers import TrainingArguments

    warmup: float = cfg.warmup_steps if cfg.warmup_steps is not None else (cfg.warmup_ratio or 0.0)
    scheduler = cfg.lr_scheduler
    if scheduler == "constant" and warmup:
        scheduler = "constant_with_warmup"
    save_steps = cfg.save_steps or _per_epoch(cfg.saves_per_epoch, epoch_steps)
    eval_steps = cfg.eval_steps or _per_epoch(cfg.evals_per_epoch, epoch_steps)
    reporters = cfg.reporters()
    if "wandb" in reporters:
        os.environ.update(wandb_environment(cfg))
    optional: dict[str, Any] = {}
    for ours, theirs in (("adam_beta1", "adam_beta1"), ("adam_beta2", "adam_beta2"), ("adam_epsilon", "adam_epsilon"), ("max_grad_norm", "max_grad_norm")):
        if getattr(cfg, ours) is not None:
            optional[theirs] = getattr(cfg, ours)
    if cfg.tf32 is not None and torch.cuda.is_available():
        optional["tf32"] = bool(cfg.tf32) if cfg.tf32 != "auto" else torch.cuda.get_device_capability()[0] >= 8
    evaluating = has_eval and cfg.evals_per_epoch != 0
    # eval batch size, early stopping / best model, torch.compile, DeepSpeed, DDP's unused-parameter search
    optional.update(loop_arguments(cfg, save_steps=save_steps, eval_steps=eval_steps, has_eval=evaluating))
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        optim=optimizer_name(cfg.optimizer),
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps or 10,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy=("steps" if eval_steps else "epoch") if evaluating else "no",
        eval_steps=eval_steps,
        prediction_loss_only=True,  # the patched model returns no logits on the loss path
        remove_unused_columns=False,  # keep position_ids / token weights from our collator
        label_names=["labels"],
        report_to=reporters or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        # transformers' default replaces a NaN/inf step loss by the running mean, so a NaN loss was
        # logged as 0 (or as a plausible number); log what the loss really is.
        logging_nan_inf_filter=False,
        # Several processes: the loss divisor is the target-token count of the whole global batch
        # (all ranks, all accumulation steps; see dft_peft/distributed.py).
        average_tokens_across_devices=True,
        **distributed.fsdp_arguments(cfg.fsdp_config, cfg.fsdp_version),  # {} unless fsdp_config
        # No gradient_checkpointing here: modeling enables it on the model, before the adapter, and
        # the Trainer's default (off) keeps it from doing so again. Passing False only warns
        # (transformers 5.2x deprecates the name).
        **optional,
    )
    try:
        return TrainingArguments(**kwargs)
    except ImportError as exc:  # DeepSpeed present but unusable (too old, a broken install)
        if not cfg.deepspeed:
            raise
        raise UserError(f"{deepspeed_missing(cfg)} ({exc})") from None


def wandb_environment(cfg: Config) -> dict[str, str]:
    """Axolotl's `wandb_*` keys as the environment variables wandb reads (as Axolotl sets them)."""
    names = {
        "wandb_project": "WANDB_PROJECT", "wandb_entity": "WANDB_ENTITY", "wandb_mode": "WANDB_MODE",
        "wandb_run_id": "WANDB_RUN_ID", "wandb_watch": "WANDB_WATCH", "wandb_log_model": "WANDB_LOG_MODEL",
        "wandb_name": "WANDB_NAME",
    }
    return {env: str(getattr(cfg, key)) for key, env in names.items() if getattr(cfg, key) is not None}


def optimizer_name(optimizer: str) -> str:
    """transformers' name for the optimizer; torchao's 8-bit AdamW falls back to bitsandbytes'
    (both keep blockwise 8-bit moments), the 4-bit one has no stand-in."""
    import importlib.util

    if optimizer in ("adamw_torch_8bit", "adamw_torch_4bit") and importlib.util.find_spec("torchao") is None:
        if optimizer == "adamw_torch_4bit":
            raise UserError("optimizer: adamw_torch_4bit needs torchao (pip install torchao), or use adamw_bnb_8bit.")
        logger.info("optimizer adamw_torch_8bit: torchao is not installed; using bitsandbytes' 8-bit AdamW")
        return "adamw_bnb_8bit"
    return optimizer
