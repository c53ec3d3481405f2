"""`train(cfg)`: one fine-tune, read top to bottom like a recipe.

config -> tokenizer -> data -> model (quantized) -> adapter -> objective patched into the model
-> transformers Trainer (atomic checkpoints, DFT diagnostics on every log line) -> outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dft_peft import distributed, modeling, planner
from dft_peft.checkpoints import AtomicCheckpointTrainer, last_checkpoint, write_atomically
from dft_peft.config import Config
from dft_peft.data import make_collator, prepare_datasets
from dft_peft.errors import UserError
from dft_peft.losses import patch_model
from dft_peft.losses.objectives import resolve_special_token_ids
from dft_peft.prior import run_prior_check
from dft_peft.metrics import install_metrics_callback
from dft_peft.config.checks import check_paths
from dft_peft.divergence import check_finite_parameters, install_divergence_guard
from dft_peft.run_identity import check_output_dir, check_resume, mark_output_dir, run_record
from dft_peft.watchdog import install_loss_watchdog

logger = logging.getLogger("dft_peft")

RESOLVED_CONFIG = "dft_peft_config.yml"


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None


def train(cfg: Config, *, overwrite: bool = False) -> TrainResult:
    torch.manual_seed(cfg.seed)
    distributed.setup_process(cfg)  # under torchrun / accelerate launch: rank 0 logs, saves
    precision = modeling.resolve_precision(cfg.bf16, cfg.fp16)

    # 0. Where the run writes: never into another run's folder, resume only its own checkpoint.
    resume = claim_output_dir(cfg, overwrite=overwrite)

    # 1. Tokenizer and data first: a broken dataset fails before minutes of model loading.
    model_path = modeling.resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file)
    planner.check_fits(cfg, model_path)  # on a CUDA card: one line, not an OOM after loading
    modeling.load_model_config(cfg, model_path)  # custom code, position limit: before any loading
    tokenizer = modeling.load_tokenizer(cfg, model_path)
    with distributed.main_process_first():  # tokenized once, by rank 0; the others read its cache
        data = prepare_data(cfg, tokenizer)
    logger.info("%d train rows, %d eval rows", len(data.train), len(data.eval) if data.eval is not None else 0)

    # 2. Model, quantization, adapter.
    model = modeling.load_model(cfg, model_path, tokenizer, precision)
    model = modeling.attach_adapter(model, cfg)
    trainable, total = modeling.parameter_counts(model)
    logger.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # Before any training: does the base model's prior on these targets suit the objective?
    prior = run_prior_check(cfg, model, tokenizer)

    # 3. The objective goes into the model: the fused path never builds full logits.
    patch_model(model, loss=cfg.loss, **resolve_special_token_ids(cfg.loss_kwargs(), tokenizer, model))
    logger.info("objective: %s %s", cfg.loss, cfg.loss_kwargs() or "")

    # 4. Trainer.
    args = training_arguments(cfg, precision, steps_per_epoch(cfg, len(data.train)), has_eval=data.eval is not None)
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator(cfg, tokenizer),
        processing_class=tokenizer,
        run_record=run_record(cfg),  # in every checkpoint: which run wrote it
    )
    install_metrics_callback(trainer)
    install_loss_watchdog(trainer, cfg)  # loss_watchdog_threshold: stop a diverging run
    install_divergence_guard(trainer, cfg)  # NaN/inf loss or gradients: stop before saving anything

    # 5. Train, resuming from the last complete checkpoint when asked (found in step 0).
    take_output_dir(cfg, overwrite=overwrite)
    if resume:
        logger.info("resuming from %s", resume)
    with distributed.exit_cleanly_on_peer_failure(cfg.output_dir):  # a killed rank: one line, not a hang
        trainer.train(resume_from_checkpoint=resume)

    # 6. Outputs: adapter, tokenizer, resolved config, metrics, each file written atomically.
    output_dir = Path(cfg.output_dir)
    state_dict = distributed.adapter_state_dict(trainer)  # FSDP: gathered from the shards, on every rank
    if distributed.is_main_process():
        save_outputs(trainer, cfg, data, output_dir, prior=prior, state_dict=state_dict)
    distributed.wait_for_everyone()
    logger.info("saved adapter, tokenizer and %s to %s", RESOLVED_CONFIG, output_dir)
    return TrainResult(output_dir, trainer.state.global_step, list(trainer.state.log_history), resume)


# ----------------------------------------------------------------------------- the steps


def prepare_data(cfg: Config, tokenizer: Any):
    return prepare_datasets(
        cfg.datasets,
        tokenizer,
        sequence_len=cfg.sequence_len,
        train_on_inputs=cfg.train_on_inputs,
        sample_packing=cfg.sample_packing,
        val_set_size=cfg.val_set_size,
        test_datasets=cfg.test_datasets,
        prepared_path=distributed.shared_prepared_path(cfg.dataset_prepared_path, cfg.output_dir),
        seed=cfg.seed,
        chat_template=cfg.chat_template_jinja or cfg.chat_template,
        excess_length_strategy=cfg.excess_length_strategy,
    )


def collator(cfg: Config, tokenizer: Any):
    return make_collator(
        tokenizer,
        sample_packing=cfg.sample_packing,
        pad_to_sequence_len=bool(cfg.pad_to_sequence_len),
        sequence_len=cfg.sequence_len,
        flatten=cfg.sample_packing and cfg.attn_implementation == "flash_attention_2",
    )


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    return max(1, math.ceil(train_rows / (cfg.micro_batch_size * cfg.gradient_accumulation_steps)))


def _per_epoch(count: int | None, epoch_steps: int) -> int | None:
    """Axolotl's saves_per_epoch / evals_per_epoch as a step interval."""
    return None if not count else max(1, epoch_steps // count)


def training_arguments(cfg: Config, precision: modeling.Precision, epoch_steps: int, *, has_eval: bool):
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
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
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
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval and cfg.evals_per_epoch != 0 else "no",
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
        # (all ranks, all accumulation steps; see dft_peft/distributed.py), and every LoRA weight
        # takes part in every forward, so DDP need not search the graph for unused ones.
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        **distributed.fsdp_arguments(cfg.fsdp_config, cfg.fsdp_version),  # {} unless fsdp_config
        # No gradient_checkpointing here: modeling enables it on the model, before the adapter, and
        # the Trainer's default (off) keeps it from doing so again. Passing False only warns
        # (transformers 5.2x deprecates the name).
        **optional,
    )


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


def claim_output_dir(cfg: Config, *, overwrite: bool = False) -> str | None:
    """The checkpoint to resume (checked to be this run's), after making sure output_dir holds no
    other run (or, with `overwrite`, that one may be moved aside); nothing is written yet."""
    check_paths(cfg)
    if overwrite and cfg.resume_from_checkpoint:
        raise UserError("--overwrite starts a new run, resume_from_checkpoint continues one; drop one of them.")
    resume = None if overwrite else checkpoint_to_resume(cfg)
    if resume:
        check_resume(Path(resume), cfg)
    check_output_dir(cfg, resuming=resume is not None, overwrite=overwrite, dry_run=True)
    return resume


def take_output_dir(cfg: Config, *, overwrite: bool = False) -> None:
    """Right before the first step: move an old run aside (`--overwrite`) and mark the folder as
    this run's. Not earlier, so a run that fails while loading leaves no folder behind."""
    if distributed.is_main_process():
        if overwrite:
            check_output_dir(cfg, resuming=False, overwrite=True)
        mark_output_dir(cfg)
    distributed.wait_for_everyone()


def checkpoint_to_resume(cfg: Config) -> str | None:
    """`resume_from_checkpoint` (must exist) or, with `auto_resume_from_checkpoints`, the last
    complete checkpoint in output_dir."""
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise UserError(
                f"resume_from_checkpoint `{path}` is not a complete checkpoint (no trainer_state.json); "
                "point it at an output_dir/checkpoint-N folder."
            )
        return str(path)
    found = last_checkpoint(cfg.output_dir)
    if cfg.auto_resume_from_checkpoints:
        return str(found) if found else None
    if found:
        logger.warning(
            "%s already holds %s; starting over. Set auto_resume_from_checkpoints: true to continue it.",
            cfg.output_dir,
            found.name,
        )
    return None


def save_outputs(
    trainer: Any, cfg: Config, data: Any, output_dir: Path, prior: Any = None, state_dict: Any = None
) -> None:
    """Adapter (PeftModel.from_pretrained loads it), tokenizer, resolved config and metrics.

    Never from weights that are no longer finite: a NaN adapter does not replace a good one."""
    check_finite_parameters(trainer.model, "the adapter")
    history = trainer.state.log_history
    summary = {
        "loss": cfg.loss,
        "loss_params": cfg.loss_kwargs(),
        "global_step": trainer.state.global_step,
        "data": data.report.to_dict(),
        "first_log": next((h for h in history if "loss" in h), None),
        "last_log": next((h for h in reversed(history) if "loss" in h), None),
        "prior_check": prior.metrics() if prior is not None else None,
    }

    def write(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        trainer.processing_class.save_pretrained(tmp)
        (tmp / RESOLVED_CONFIG).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        (tmp / "train_metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        (tmp / "log_history.json").write_text(json.dumps(history, indent=2, default=str))

    write_atomically(output_dir, write)
