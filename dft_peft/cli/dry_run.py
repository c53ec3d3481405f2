"""What a run would do, without training: for `dft-peft validate`.

Trainable parameters are counted on a weightless ("meta") copy of the model with the adapter
attached, so validating an 8B config takes seconds and no memory.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from dft_peft.model import hub
from dft_peft.model import adapter, loading, loftq, source
from dft_peft.errors import UserError


def count_parameters_without_weights(cfg: Any, model_path) -> tuple[int, int]:
    """(trainable, total) with the configured LoRA, from the model config alone."""
    import peft
    from transformers import AutoModelForCausalLM

    config_source = hub.local_source(cfg, "base_model_config") or model_path
    config = loading.load_model_config(cfg, config_source)  # trust_remote_code, position limit: one line
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_model_dir:
        with loftq.loftq_anywhere():  # a saved LoftQ adapter: only its shapes on meta
            model = peft.PeftModel.from_pretrained(model, hub.local_source(cfg, "lora_model_dir"), is_trainable=True)
    else:
        plain = cfg.model_copy(update={"load_in_4bit": False, "load_in_8bit": False, "gradient_checkpointing": False})
        model = adapter.attach_adapter(model, plain)
    return loading.parameter_counts(model)


def describe_run(cfg: Any) -> str:
    from dft_peft.train import prepare_data
    from dft_peft.training.arguments import steps_per_epoch

    precision, attention, notes = machine_notes(cfg)
    quant = "4-bit " + cfg.bnb_4bit_quant_type if cfg.load_in_4bit else "8-bit" if cfg.load_in_8bit else "none"
    lines = [
        "# what the run would do",
        f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}",
        f"precision: {precision.name}; quantization: {quant}; attention: {attention or 'model default'}",
        f"objective: {cfg.loss} {cfg.loss_kwargs() or ''}".rstrip(),
        *(f"note: {n}" for n in notes),
    ]
    try:
        model_path = _model_files_for_validation(cfg)
    except UserError as exc:
        lines.append(f"model: not available locally ({exc})")
        return "\n".join(lines)
    lines.append(f"model: {cfg.base_model} -> {model_path}")
    trainable, total = count_parameters_without_weights(cfg, model_path)
    lines.append(f"adapter: {cfg.adapter} r={cfg.lora_r} alpha={cfg.lora_alpha}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    tokenizer = loading.load_tokenizer(cfg, model_path)
    data = prepare_data(cfg, tokenizer)
    lines.append(data.summary())
    per_epoch = steps_per_epoch(cfg, len(data.train))
    steps = cfg.max_steps or int(per_epoch * cfg.num_epochs)
    lines.append(
        f"optimizer steps: {steps} ({per_epoch} per epoch; {cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} "
        f"= {cfg.effective_batch_size} rows per step)"
    )
    return "\n".join(lines)


def _model_files_for_validation(cfg: Any):
    """What validate needs of the base model: a hub id's config and tokenizer only (the
    weights are not needed to count parameters on a weightless copy); anything else as train finds it."""
    if hub.is_hub_id(cfg.base_model) and not cfg.gguf_file:
        return hub.fetch(cfg.base_model, "tokenizer", revision=cfg.model_revision, key="base_model")
    return source.resolve_model_path(cfg.base_model, cfg.model_revision, cfg.gguf_file)


def machine_notes(cfg: Any) -> tuple[loading.Precision, str | None, list[str]]:
    """(precision, attention, notes): what the run would use here, and what differs from the
    config because of this machine. A config written for a GPU is still valid on a laptop:
    validate lists the differences, `train` is the one that stops."""
    notes: list[str] = []
    cuda = torch.cuda.is_available()
    try:
        precision = loading.resolve_precision(cfg.bf16, cfg.fp16)
    except UserError as exc:
        precision = loading.resolve_precision("auto", None)
        notes.append(f"on this machine `train` would stop: {exc} (valid on a GPU that has it)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention = loading.resolve_attention(cfg.attn_implementation)
    notes += [f"{w.message} (here; the config is fine for an Ampere+ GPU with flash-attn)" for w in caught]
    if not cuda and (cfg.load_in_4bit or cfg.load_in_8bit):
        bits = "4-bit" if cfg.load_in_4bit else "8-bit"
        notes.append(f"no CUDA GPU: {bits} bitsandbytes layers would run on the CPU, far slower than on a GPU")
    if not cuda and str(cfg.optimizer).startswith("paged_"):
        notes.append(f"optimizer {cfg.optimizer}: paged optimizer states need a CUDA GPU to page")
    return precision, attention, notes
