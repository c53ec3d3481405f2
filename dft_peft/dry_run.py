"""What a run would do, without training: for `dft-peft validate`.

Trainable parameters are counted on a weightless ("meta") copy of the model with the adapter
attached, so validating an 8B config takes seconds and no memory.
"""

from __future__ import annotations

from typing import Any

import torch

from dft_peft import modeling
from dft_peft.errors import UserError


def count_parameters_without_weights(cfg: Any, model_path) -> tuple[int, int]:
    """(trainable, total) with the configured LoRA, from the model config alone."""
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.base_model_config or model_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_model_dir:
        model = peft.PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True)
    else:
        plain = cfg.model_copy(update={"load_in_4bit": False, "load_in_8bit": False, "gradient_checkpointing": False})
        model = modeling.attach_adapter(model, plain)
    return modeling.parameter_counts(model)


def describe_run(cfg: Any) -> str:
    from dft_peft.train import prepare_data, steps_per_epoch

    precision = modeling.resolve_precision(cfg.bf16, cfg.fp16)
    quant = "4-bit " + cfg.bnb_4bit_quant_type if cfg.load_in_4bit else "8-bit" if cfg.load_in_8bit else "none"
    lines = [
        "# what the run would do",
        f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}",
        f"precision: {precision.name}; quantization: {quant}; attention: {modeling.resolve_attention(cfg.attn_implementation) or 'model default'}",
        f"objective: {cfg.loss} {cfg.loss_kwargs() or ''}".rstrip(),
    ]
    try:
        model_path = modeling.resolve_model_path(cfg.base_model, cfg.model_revision)
    except UserError as exc:
        lines.append(f"model: not available locally ({exc})")
        return "\n".join(lines)
    lines.append(f"model: {cfg.base_model} -> {model_path}")
    trainable, total = count_parameters_without_weights(cfg, model_path)
    lines.append(f"adapter: {cfg.adapter} r={cfg.lora_r} alpha={cfg.lora_alpha}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    tokenizer = modeling.load_tokenizer(cfg, model_path)
    data = prepare_data(cfg, tokenizer)
    lines.append(data.summary())
    per_epoch = steps_per_epoch(cfg, len(data.train))
    steps = cfg.max_steps or int(per_epoch * cfg.num_epochs)
    lines.append(
        f"optimizer steps: {steps} ({per_epoch} per epoch; {cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} "
        f"= {cfg.effective_batch_size} rows per step)"
    )
    return "\n".join(lines)
