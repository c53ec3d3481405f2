"""LoftQ initialisation of LoRA: Axolotl's `peft: {loftq_config: {loftq_bits: 4}}`.

Axolotl 0.19 (loaders/adapter.py `_build_lora_config_kwargs`) gives peft
`LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=N))` for a model loaded
in full precision, without k-bit preparation (loaders/model.py). peft then replaces each adapted
Linear's weight W by Q, its bitsandbytes NF4 (8: int8) round trip kept in W's dtype, and starts
LoRA at the rank-r SVD of W - Q (B = L, A = R). dft-peft builds the same LoraConfig.

Why this module: peft's `loftq_init` (peft/utils/loftq_utils.py, 0.17 to 0.21) computes on "cuda"
(or "xpu") unconditionally, although bitsandbytes' NF4 and int8 round trips run on the CPU too, and
it cannot run on the weightless ("meta") model of `validate` and the memory rehearsal.
`loftq_anywhere()` lends peft, while it builds LoRA layers, a `loftq_init` that is peft's own on a
CUDA/XPU machine, the same steps on the CPU elsewhere, and on meta only the adapter's shapes. peft
runs LoftQ again when it loads a saved LoftQ adapter (its adapter_config.json says "loftq"), which
gives the trained adapter its base Q back; so `PeftModel.from_pretrained` goes through it too.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from contextlib import contextmanager
from typing import Any

import torch

from dft_peft.config.loftq_keys import loftq_bits
from dft_peft.errors import UserError


def lora_init_kwargs(cfg: Any) -> dict[str, Any]:
    """`init_lora_weights` and `loftq_config` for peft's LoraConfig (empty without LoftQ)."""
    bits = loftq_bits(cfg)
    if not bits:
        return {}
    if importlib.util.find_spec("scipy") is None:  # peft's LoraConfig imports it for LoftQ
        raise UserError("peft.loftq_config: peft's LoftQ needs scipy, which is not installed: pip install scipy")
    import peft

    scale = cfg.lora_alpha / (math.sqrt(cfg.lora_r) if getattr(cfg, "peft_use_rslora", False) else cfg.lora_r)
    if scale != 1:
        warnings.warn(  # shown once, though the memory rehearsal attaches the adapter too
            f"peft.loftq_config: peft sets LoRA's B@A to the quantization error W - Q without dividing by the LoRA "
            f"scale ({scale:g} here), so the model starts at Q + {scale:g}*(W - Q), as in Axolotl; lora_alpha = lora_r "
            "starts it at W.",
            UserWarning,
            stacklevel=2,
        )
    return {"init_lora_weights": "loftq", "loftq_config": peft.LoftQConfig(loftq_bits=bits)}


def check_targets(model: Any, targets: list[str], cfg: Any) -> None:
    """peft's LoftQ initialises Linear layers only (on an Embedding it fails with a TypeError)."""
    if not loftq_bits(cfg):
        return
    embeddings = sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in targets
    })
    if embeddings:
        raise UserError(f"peft.loftq_config: peft's LoftQ initialises Linear layers only; remove {embeddings} from lora_target_modules.")


@torch.no_grad()
def loftq_init_on_cpu(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """peft's `loftq_init` step for step, computed on the CPU: (Q in weight's dtype, A, B)."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    if num_bits not in (4, 8):
        raise ValueError("Only nf4 and int8 quantization is supported")
    original = weight.detach().to("cpu", torch.float32)
    residual = original.clone()
    for i in range(num_iter):
        if num_bits == 4:
            q = bnb.nn.Params4bit(residual, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
            dequantized = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        else:
            q = bnb.nn.Int8Params(residual, requires_grad=False).to("cpu")
            dequantized = bnb.functional.int8_vectorwise_dequant(q.data, q.SCB)
        residual = original - dequantized
        low_rank = _low_rank_decomposition(residual, reduced_rank=reduced_rank)
        lora_b, lora_a = low_rank["L"], low_rank["R"]
        if i + 1 == num_iter:
            break
        residual = original - lora_b @ lora_a
    return dequantized.to(weight.device, weight.dtype), lora_a.to(weight.device), lora_b.to(weight.device)


def _has_gpu() -> bool:
    from peft.import_utils import is_xpu_available

    return torch.cuda.is_available() or is_xpu_available()


@contextmanager
def loftq_anywhere():
    """While peft builds or loads LoRA layers, its LoftQ runs on this machine (see the module doc)."""
    from peft.tuners.lora import layer

    peft_loftq_init = getattr(layer, "loftq_init", None)
    if peft_loftq_init is None:  # another peft layout: leave it as it is
        yield
        return

    def loftq_init(weight, num_bits, reduced_rank, num_iter=1):
        if weight.device.type == "meta":  # validate / memory rehearsal: shapes, no values
            out_features, in_features = weight.shape
            # on the default device, where peft has just created the LoRA weights (it moves them to meta after)
            return weight.data, torch.zeros(reduced_rank, in_features), torch.zeros(out_features, reduced_rank)
        if _has_gpu():
            return peft_loftq_init(weight, num_bits, reduced_rank, num_iter)
        return loftq_init_on_cpu(weight, num_bits, reduced_rank, num_iter)

    layer.loftq_init = loftq_init
    try:
        yield
    finally:
        layer.loftq_init = peft_loftq_init
