"""The human-readable summary `dft-peft validate` prints before the resolved config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from dft_peft.config.axolotl_translate import MAPPED

if TYPE_CHECKING:
    from dft_peft.config.schema import ConfigSchema as Config


def describe(cfg: Config) -> str:
    """A human-readable summary plus the full resolved config, for `dft-peft validate`."""
    quant = "none"
    if cfg.load_in_4bit:
        double = ", double quant" if cfg.bnb_4bit_use_double_quant else ""
        quant = f"4-bit {cfg.bnb_4bit_quant_type}{double}"
    elif cfg.load_in_8bit:
        quant = "8-bit"
    if cfg.peft and cfg.peft.loftq_config:
        quant += f" (LoftQ: {cfg.peft.loftq_config.loftq_bits}-bit base rounded at adapter init)"
    elif cfg.model_quantization_config:
        dequantized = (cfg.model_quantization_config_kwargs or {}).get("dequantize")
        quant = f"the checkpoint's own ({cfg.model_quantization_config}{', dequantized at load' if dequantized else ''})"
    targets = (
        "all linear layers" if cfg.lora_target_linear else f"{cfg.lora_target_modules}"
    )
    params = ", ".join(f"{k}={v}" for k, v in cfg.loss_kwargs().items())
    datasets = "; ".join(f"{ds.path} ({ds.type})" for ds in cfg.datasets)
    length = (
        f"max_steps {cfg.max_steps}" if cfg.max_steps else f"num_epochs {cfg.num_epochs}"
    )
    if cfg.warmup_steps:
        warmup = f", warmup_steps {cfg.warmup_steps}"
    elif cfg.warmup_ratio:
        warmup = f", warmup_ratio {cfg.warmup_ratio}"
    else:
        warmup = ""
    lines = [
        f"config:      {cfg.source_path or '(from a mapping)'}",
        f"objective:   loss: {cfg.loss}" + (f" ({params})" if params else ""),
        f"model:       {cfg.base_model}",
        f"adapter:     {cfg.adapter} r={cfg.lora_r} alpha={cfg.lora_alpha} "
        f"dropout={cfg.lora_dropout} on {targets}; quantization: {quant}",
        f"data:        {datasets}",
        f"             sequence_len {cfg.sequence_len}, sample_packing {cfg.sample_packing}, "
        f"val_set_size {cfg.val_set_size}",
        f"batch:       {cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} "
        f"accumulation = {cfg.effective_batch_size} sequences per optimizer step",
        f"schedule:    {length}; {cfg.optimizer}, lr {cfg.learning_rate}, "
        f"{cfg.lr_scheduler}{warmup}{_restarts(cfg)}",
        f"precision:   bf16 {cfg.bf16}, fp16 {cfg.fp16}; gradient_checkpointing "
        f"{cfg.gradient_checkpointing}; attention {cfg.attn_implementation or 'default'}",
        f"output_dir:  {cfg.output_dir}",
    ]
    mapped = {k: why.removeprefix(MAPPED) for k, why in cfg._ignored.items() if why.startswith(MAPPED)}
    noted = {k: why for k, why in cfg._ignored.items() if why != "unset" and k not in mapped}
    unset = [k for k, why in cfg._ignored.items() if why == "unset"]
    if mapped:
        lines.append("mapped:      " + "; ".join(f"{k}: {why}" for k, why in mapped.items()))
    if noted:
        lines.append("ignored:     " + ", ".join(f"{k} ({why})" for k, why in noted.items()))
    if unset:
        lines.append("left empty:  " + ", ".join(unset) + " (Axolotl keys, nothing to do)")
    body = yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False, allow_unicode=True)
    return "\n".join(lines) + "\n\n# resolved config\n" + body


def _restarts(cfg: Config) -> str:
    """ReLoRA / jagged restarts, which reshape the schedule line's learning rate."""
    if not cfg.jagged_restart_steps:
        return ""
    what = "ReLoRA merge and restart" if cfg.relora else "learning-rate restart"
    return f"; {what} every {cfg.jagged_restart_steps} steps"
