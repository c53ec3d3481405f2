"""The base weights a ReLoRA run leaves (`relora_base_weights.safetensors`): written by training,
read back by a resumed run and by everything that loads a trained adapter (generate, eval, merge,
GGUF export), since after a restart the adapter alone is only the last cycle's update.

Kept in the model room because loading for inference (`dft_peft.model.loading`) needs it and the
training room sits above it; `dft_peft.training.relora` does the merging and restarting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dft_peft.errors import UserError

BASE_WEIGHTS = "relora_base_weights.safetensors"


def lora_layers(model: Any) -> dict[str, Any]:
    """{name of the wrapped module in the base model: peft LoraLayer} for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer) and module.lora_A}


def _kind(weight: Any) -> str:
    name = type(weight).__name__
    return "4bit" if name == "Params4bit" else "8bit" if name == "Int8Params" else "full"


def dequantized_weight(weight: Any, device: Any) -> torch.Tensor:
    """The base weight as a float tensor on `device` (bitsandbytes' 4-bit / 8-bit dequantized)."""
    kind = _kind(weight)
    if kind == "4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(device)
    if kind == "8bit":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=None).to(device)
    return weight.data.to(device)


def set_base_weight(base_layer: Any, weight: Any, value: torch.Tensor) -> None:
    """Put `value` into the base layer, quantized again as the weight was."""
    kind = _kind(weight)
    if kind == "full":
        weight.data.copy_(value.to(weight.dtype))
        return
    import bitsandbytes as bnb

    device = weight.device
    if kind == "4bit":
        settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        settings.update(requires_grad=False, bnb_quantized=False)
        dtype = weight.quant_state.dtype
        base_layer.weight = bnb.nn.Params4bit(value.to("cpu", dtype), **settings).to(device)
    else:
        base_layer.weight = bnb.nn.Int8Params(value.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False).to(device)


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The (merged) base weights of the LoRA-wrapped modules, dequantized, on the CPU."""
    return {
        f"{name}.weight": dequantized_weight(layer.get_base_layer().weight, "cpu").contiguous()
        for name, layer in lora_layers(model).items()
    }


@torch.no_grad()
def load_base_weights(model: Any, path: Path) -> None:
    """Put the weights of `relora_base_weights.safetensors` back into the base model."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    for name, layer in lora_layers(model).items():
        if f"{name}.weight" not in saved:
            raise UserError(f"{path}: no weight for `{name}`; the checkpoint belongs to another model or adapter.")
        base_layer = layer.get_base_layer()
        set_base_weight(base_layer, base_layer.weight, saved[f"{name}.weight"].to(torch.float32))
