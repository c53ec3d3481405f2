"""Axolotl's `quantize_moe_experts`: store a MoE model's fused expert weights in 4 (or 8) bits.

In transformers 5 the experts of Qwen3-MoE, Qwen3-Next, GLM, Nemotron-H, ... are 3-D
`nn.Parameter`s ([experts, out, in]) of one module, not `nn.Linear`s, so bitsandbytes' Linear4bit
replacement (`load_in_4bit`) leaves them in bf16: most of a MoE model's bytes. Axolotl 0.19
(src/axolotl/monkeypatch/moe_quant.py) quantizes each such parameter while the checkpoint loads,
with bitsandbytes' parametrization (`bitsandbytes.nn.parametrize.replace_parameter_4bit`): the
parameter is replaced by its packed NF4/FP4 bytes and dequantized whenever the expert module reads
it (cached for the length of one forward of that module). We do the same: a parameter whose name
contains `expert` and has 3 or more dimensions is quantized the moment it is loaded (so the bf16
copy of all experts never exists at once), with the config's `bnb_4bit_quant_type` and
`bnb_4bit_use_double_quant`; with `load_in_8bit`, row-wise int8 as Axolotl does. The experts stay
frozen (LoRA trains attention and any dense layers); the base model's output is the same
computation on the dequantized experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dft_peft.errors import UserError

# peft matches `target_modules` by name suffix; the parametrization's synthetic module
# `experts.parametrizations.down_proj` would match `down_proj` and fail (not a Linear).
PARAMETRIZED_EXCLUDE = r".*\.parametrizations\..*"


def check_moe_quant(cfg: Any) -> None:
    """Axolotl's rules for the key (schemas/config.py `check_quantize_moe_experts`)."""
    if not getattr(cfg, "quantize_moe_experts", False):
        return
    if cfg.adapter not in ("lora", "qlora"):
        raise UserError("quantize_moe_experts: true needs `adapter: lora` or `qlora` (the experts are frozen 4-bit).")
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        raise UserError("quantize_moe_experts: true needs `load_in_4bit: true` (or `load_in_8bit: true`).")


def _is_expert(name: str, value: torch.Tensor) -> bool:
    return value.ndim >= 3 and "expert" in name.lower()


def _skip_module(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


class Int8RowParametrization(torch.nn.Module):
    """Row-wise int8 (bitsandbytes `int8_vectorwise_quant`), dequantized on access (Axolotl's 8-bit mode)."""

    def __init__(self, row_stats: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("row_stats", row_stats)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        shape = quantized.shape
        out = bnb.functional.int8_vectorwise_dequant(quantized.reshape(-1, shape[-1]), self.row_stats)
        return out.reshape(shape).to(self.dtype)


def _quantize_8bit(module: torch.nn.Module, name: str) -> None:
    import bitsandbytes as bnb
    import torch.nn.utils.parametrize as P
    from bitsandbytes.nn.parametrize import _register_parametrization_hooks

    value = getattr(module, name)
    shape, dtype = value.shape, value.dtype
    data, row_stats, _ = bnb.functional.int8_vectorwise_quant(value.data.reshape(-1, shape[-1]).to(torch.float16))
    setattr(module, name, torch.nn.Parameter(data.reshape(shape), requires_grad=False))
    P.register_parametrization(module, name, Int8RowParametrization(row_stats, dtype), unsafe=True)
    _register_parametrization_hooks(module, name)


def quantize_parameter(module: torch.nn.Module, name: str, *, bits: int = 4, quant_type: str = "nf4",
                       double_quant: bool = True) -> None:
    """Replace `module.<name>` by its quantized bytes plus a dequantizing parametrization."""
    if bits == 8:
        _quantize_8bit(module, name)
        return
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    replace_parameter_4bit(module, name, compress_statistics=double_quant, quant_type=quant_type)


def expert_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(full name, module, parameter name) of every fused expert parameter not yet quantized."""
    for module_name, module in model.named_modules():
        if _skip_module(module) or ".parametrizations" in f".{module_name}":
            continue
        for pname, value in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            if _is_expert(full, value) and value.is_floating_point():
                yield full, module, pname


def _options(cfg: Any) -> dict[str, Any]:
    if getattr(cfg, "load_in_8bit", False) and not getattr(cfg, "load_in_4bit", False):
        return {"bits": 8}
    double = getattr(cfg, "bnb_4bit_use_double_quant", True)
    return {"bits": 4, "quant_type": getattr(cfg, "bnb_4bit_quant_type", "nf4") or "nf4",
            "double_quant": True if double is None else bool(double)}


def quantize_experts(model: torch.nn.Module, cfg: Any) -> int:
    """Quantize every fused expert parameter still in floating point; returns how many."""
    options = _options(cfg)
    count = 0
    for _full, module, pname in list(expert_parameters(model)):
        quantize_parameter(module, pname, **options)
        count += 1
    return count


@contextmanager
def quantizing_experts_on_load(cfg: Any):
    """While a checkpoint loads, quantize each expert parameter as soon as it is set (Axolotl's
    patch of `transformers.core_model_loading.set_param_for_module`), so peak memory holds one
    layer's bf16 experts at most. Yields a list that collects the quantized names."""
    import transformers.core_model_loading as loading
    import transformers.modeling_utils as modeling_utils

    done: list[str] = []
    if not getattr(cfg, "quantize_moe_experts", False):
        yield done
        return
    options = _options(cfg)
    original_set = loading.set_param_for_module
    original_warmup = getattr(modeling_utils, "caching_allocator_warmup", None)

    def set_param(model, target_name, param_value, *args, **kwargs):
        original_set(model, target_name, param_value, *args, **kwargs)
        if not _is_expert(target_name, param_value):
            return
        module_path, _, pname = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        value = module._parameters.get(pname)
        if _skip_module(module) or value is None or not value.is_floating_point():
            return
        quantize_parameter(module, pname, **options)
        done.append(target_name)

    loading.set_param_for_module = set_param
    if original_warmup is not None:  # it would reserve the bf16 size of every weight up front
        modeling_utils.caching_allocator_warmup = lambda *a, **k: None
    try:
        yield done
    finally:
        loading.set_param_for_module = original_set
        if original_warmup is not None:
            modeling_utils.caching_allocator_warmup = original_warmup


def quantized_expert_bytes(model: torch.nn.Module) -> int:
    """Bytes the quantized expert weights take (packed data; quantization statistics excluded)."""
    total = 0
    for name, value in model.named_parameters():
        if ".parametrizations." in name and name.endswith(".original") and "expert" in name.lower():
            total += value.numel() * value.element_size()
    return total
