"""`train(cfg)`: one fine-tune, read top to bottom like a recipe.

config -> tokenizer -> data -> model (quantized) -> adapter -> activation memory -> objective
patched into the model -> transformers Trainer (atomic checkpoints, DFT diagnostics on every log
line) -> outputs. Each step is a call into a room below: `model/`, `data/`, `memory/`, `losses/`,
`evaluate/` (the prior check), `training/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dft_peft.config import Config
from dft_peft.data import make_collator, prepare_datasets
from dft_peft.evaluate.prior import run_prior_check
from dft_peft.losses import patch_model
from dft_peft.losses.objectives import resolve_special_token_ids
from dft_peft.memory import preflight
from dft_peft.memory.activations import apply_activation_memory
from dft_peft.model import adapter, loading, source
from dft_peft.training import distributed
from dft_peft.training.arguments import steps_per_epoch, training_arguments
from dft_peft.training.checkpoints import AtomicCheckpointTrainer
from dft_peft.training.divergence import install_divergence_guard
from dft_peft.training.jagged_schedule import install_jagged_restarts
from dft_peft.training.loop_options import install_early_stopping, install_quadratic_warmup
from dft_peft.training.metrics import install_metrics_callback
from dft_peft.training.output_dir import claim_output_dir, take_output_dir
from dft_peft.training.outputs import RESOLVED_CONFIG, save_outputs
from dft_peft.training.relora import install_relora
from dft_peft.training.run_identity import run_record
from dft_peft.training.watchdog import install_loss_watchdog

logger = logging.getLogger("dft_peft")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None


def train(cfg: Config, *, overwrite: bool = False) -> TrainResult:
    torch.manual_seed(cfg.seed)
    distributed.setup_process(cfg)  # under torchrun / accelerate launch: rank 0 logs, saves
    precision = loading.resolve_precision(cfg.bf16, cfg.fp16)

    # 0. Where the run writes: never into another run's folder, resume only its own checkpoint.
    resume = claim_output_dir(cfg, overwrite=overwrite)

    # 1. Tokenizer and data first: a broken dataset fails before minutes of model loading.
    model_path = source.resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file)
    preflight.check_fits(cfg, model_path)  # on a CUDA card: the step rehearsed on meta (~10 s for 8B), else the planner
    loading.load_model_config(cfg, model_path)  # custom code, position limit: before any loading
    tokenizer = loading.load_tokenizer(cfg, model_path)
    with distributed.main_process_first():  # tokenized once, by rank 0; the others read its cache
        data = prepare_data(cfg, tokenizer)
    logger.info("%d train rows, %d eval rows", len(data.train), len(data.eval) if data.eval is not None else 0)

    # 2. Model, quantization, adapter.
    model = loading.load_model(cfg, model_path, tokenizer, precision)
    model = adapter.attach_adapter(model, cfg)
    for applied in apply_activation_memory(model, cfg):  # offloaded checkpointing, ...
        logger.info("activation memory: %s", applied)
    trainable, total = loading.parameter_counts(model)
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
    install_early_stopping(trainer, cfg)  # early_stopping_patience: transformers' EarlyStoppingCallback
    install_quadratic_warmup(trainer, cfg)  # lr_quadratic_warmup: Axolotl's cosine schedule
    install_jagged_restarts(trainer, cfg)  # jagged_restart_steps: the schedule dips at each restart
    install_relora(trainer, cfg, resume)  # relora: merge LoRA into the base and restart it

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


# ----------------------------------------------------------------------------- data steps of the recipe


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
        deduplicate=bool(cfg.dataset_exact_deduplication),
    )


def collator(cfg: Config, tokenizer: Any):
    return make_collator(
        tokenizer,
        sample_packing=cfg.sample_packing,
        pad_to_sequence_len=bool(cfg.pad_to_sequence_len),
        sequence_len=cfg.sequence_len,
        flatten=cfg.sample_packing and cfg.attn_implementation == "flash_attention_2",
    )
