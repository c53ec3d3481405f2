"""The adapter: LoRA (QLoRA on a 4-bit model, LoftQ-initialised with `peft.loftq_config`) through
peft, or a saved adapter from `lora_model_dir`, with gradient checkpointing enabled the way peft
expects it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dft_peft.config.checks import check_lora_targets_exist
from dft_peft.errors import UserError
from dft_peft.model import hub, loftq
from dft_peft.model.moe_quant import PARAMETRIZED_EXCLUDE


def linear_module_names(model: Any) -> list[str]:
    """Names (last component) of every linear layer except the output head: Axolotl's
    `lora_target_linear`, covering plain, 4-bit and 8-bit bitsandbytes linears."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not head
    }
    return sorted(names)


def restore_half_precision_embeddings(model: Any, cfg: Any) -> list[str]:
    """Put the frozen embeddings and LM head back in the 4-bit compute dtype (bf16/fp16).

    peft's `prepare_model_for_kbit_training` casts every non-quantized weight to fp32. For the
    embeddings that makes the whole residual stream fp32 (twice the activation memory of every
    checkpointed layer input), and for the head it stores a second, fp32 copy of a [vocab, hidden]
    matrix (2 GB for Llama-3-8B) that the fused loss does not need: it multiplies a bf16 head into
    fp32 logits chunk by chunk. Axolotl casts them back the same way. Norms stay fp32. Heads or
    embeddings trained through `lora_modules_to_save` keep fp32. Returns the modules cast.
    """
    import torch

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = getattr(quant, "bnb_4bit_compute_dtype", None) if getattr(quant, "load_in_4bit", False) else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.bfloat16, torch.float16):
        return []
    trained = set(cfg.lora_modules_to_save or [])
    cast = []
    for name, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if module is None or name in trained or module.weight.dtype == dtype:
            continue
        module.to(dtype)
        cast.append(name)
    return cast


def restore_half_precision_norms(model: Any) -> int:
    """Put the frozen RMSNorm/LayerNorm weights back in the 4-bit compute dtype (bf16/fp16).

    peft's k-bit preparation leaves them fp32, and a Llama-family RMSNorm returns
    `weight * x.to(input_dtype)`: an fp32 weight makes every norm output fp32, bitsandbytes'
    Linear4bit returns its input's dtype, and the whole residual stream turns fp32. The meta
    rehearsal (dft_peft/memory/rehearsal.py) showed what that costs: twice the checkpointed layer
    inputs (Llama-3.1-8B at 32k tokens: 16 GiB instead of 8, and as much pinned RAM under offload)
    and fp32 q/k/v. The norm still normalises in fp32 inside; only its weight and output are
    half precision, as in any bf16 model (Axolotl casts norms to the compute dtype as well when
    flash attention is on). Returns how many norm modules were cast.
    """
    import torch

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = getattr(quant, "bnb_4bit_compute_dtype", None) if getattr(quant, "load_in_4bit", False) else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.bfloat16, torch.float16):
        return 0
    cast = 0
    for module in model.modules():
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if not name.endswith(("RMSNorm", "LayerNorm")) or not isinstance(weight, torch.nn.Parameter):
            continue
        if weight.requires_grad or weight.dtype == dtype:
            continue
        module.to(dtype)
        cast += 1
    return cast


def _as_list(value: Any) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value else None)


def attach_adapter(model: Any, cfg: Any):
    """LoRA (or QLoRA on a 4-bit model) through peft, or a saved adapter from `lora_model_dir`."""
    import peft

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    checkpointing_kwargs = cfg.gradient_checkpointing_kwargs or {"use_reentrant": False}
    if quantized:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
        restore_half_precision_embeddings(model, cfg)
        restore_half_precision_norms(model)  # else norm outputs, and the residual stream, are fp32
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    if cfg.lora_model_dir:
        adapter_dir = hub.local_source(cfg, "lora_model_dir")
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise UserError(f"lora_model_dir `{cfg.lora_model_dir}` has no adapter_config.json; point it at a saved adapter.")
        with loftq.loftq_anywhere():  # a saved LoftQ adapter: peft quantizes the base again
            return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    targets: list[str] = []
    if cfg.lora_target_modules:
        targets = [cfg.lora_target_modules] if isinstance(cfg.lora_target_modules, str) else list(cfg.lora_target_modules)
    if isinstance(cfg.lora_target_modules, list):
        check_lora_targets_exist(model, cfg.lora_target_modules)  # peft fails only when none matches
    if cfg.lora_target_linear:
        targets = sorted(set(targets) | set(linear_module_names(model)))
    loftq.check_targets(model, targets, cfg)
    # MoE experts quantized by `quantize_moe_experts` expose `experts.parametrizations.<name>`
    # modules; peft's name-suffix match must not take them for a `down_proj` layer.
    parametrized = any(".parametrizations." in f"{name}." for name, _ in model.named_modules())
    lora_config = peft.LoraConfig(
        exclude_modules=PARAMETRIZED_EXCLUDE if parametrized else None,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        # fused MoE expert tensors (3-D parameters), as Axolotl passes `lora_target_parameters`
        target_parameters=_as_list(getattr(cfg, "lora_target_parameters", None)),
        modules_to_save=cfg.lora_modules_to_save,
        use_rslora=bool(getattr(cfg, "peft_use_rslora", False)),
        fan_in_fan_out=bool(getattr(cfg, "lora_fan_in_fan_out", False)),
        task_type="CAUSAL_LM",
        **loftq.lora_init_kwargs(cfg),  # `peft.loftq_config`: init_lora_weights="loftq", as Axolotl passes it
    )
    try:
        with loftq.loftq_anywhere():
            return peft.get_peft_model(model, lora_config)
    except ValueError as exc:
        raise UserError(f"lora_target_modules: {exc}".splitlines()[0]) from None
