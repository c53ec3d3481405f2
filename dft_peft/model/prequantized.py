"""Axolotl's `model_quantization_config`: a checkpoint stored in a quantized format of its own.

gpt-oss ships its MoE experts in MXFP4 (4-bit values, one power-of-two scale per 32 values);
DeepSeek-V3-style checkpoints ship FP8 blocks. transformers reads both through its own quantizers,
and Axolotl 0.19 only builds transformers' config from the name and its kwargs
(`loaders/model.py` `_set_quantization_config`); so do we, so that a config copied from Axolotl
loads the same weights. transformers' MXFP4 kernels are inference-only (its quantizer says it
cannot train), so a run needs `dequantize: true`: the experts become bf16 at load, the very values
the checkpoint encodes, and stay frozen under LoRA. That rule is checked with the config
(`dft_peft.config.checks`), before any download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dft_peft.errors import UserError


def prequantized_config(cfg: Any, model_path: Path):
    """transformers' quantization config named by `model_quantization_config`, or None."""
    name = getattr(cfg, "model_quantization_config", None)
    if name is None:
        return None
    import transformers

    kwargs = dict(cfg.model_quantization_config_kwargs or {})
    if name == "FineGrainedFP8Config" and not torch.cuda.is_available() and not kwargs.get("dequantize"):
        if not _stored_quantized(model_path):  # transformers would quantize to FP8 here: GPU only
            raise UserError(
                "model_quantization_config: FineGrainedFP8Config quantizes to FP8 on a CUDA GPU (compute capability "
                ">= 8.9); on this machine use `load_in_4bit: true`, or a checkpoint already stored in FP8."
            )
    try:
        return getattr(transformers, name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model_quantization_config_kwargs: not arguments of transformers' {name} ({exc}).") from None


def _stored_quantized(model_path: Path) -> bool:
    """Whether the checkpoint's config.json says its weights are stored quantized."""
    config = Path(model_path, "config.json")
    return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
