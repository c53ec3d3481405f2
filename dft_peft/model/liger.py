"""Liger's non-loss kernels (`liger_rms_norm`, `liger_glu_activation`, `liger_layer_norm`,
`liger_rope`), as Axolotl's LigerPlugin applies them.

They compute the same functions as the model's own modules (fused Triton kernels, less memory),
so when liger-kernel is not installed, or there is no CUDA GPU for Triton, the run goes on with
the model's own code and one info line says so. Liger's loss kernels are never applied: the loss
is dft-peft's fused objective.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger("dft_peft")


def requested_kernels(cfg: Any) -> dict[str, bool]:
    """liger_kernel's keyword -> on, for the kernels the config asks for."""
    def on(key: str) -> bool:
        return bool(getattr(cfg, key, None))

    glu = on("liger_glu_activation") or on("liger_swiglu")
    wanted = {
        "rope": on("liger_rope"),
        "rms_norm": on("liger_rms_norm"),
        "layer_norm": on("liger_layer_norm"),
        "swiglu": glu,
        "geglu": glu,
    }
    return {k: v for k, v in wanted.items() if v}


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    import torch

    if not torch.cuda.is_available():
        return "Liger's Triton kernels need a CUDA GPU"
    return None


def apply_liger_kernels(model: Any, cfg: Any) -> list[str]:
    """Swap in the requested kernels on the loaded model (before the adapter); returns their
    names, or [] with an info line when they cannot run here."""
    wanted = requested_kernels(cfg)
    if not wanted:
        return []
    reason = unavailable_reason()
    if reason:
        logger.info("liger kernels %s not applied: %s; the model's own modules compute the same", sorted(wanted), reason)
        return []
    import inspect

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    accepted = set(inspect.signature(_apply_liger_kernel_to_instance).parameters)
    apply_fn = _model_apply_fn(model)
    if apply_fn is not None:
        accepted = set(inspect.signature(apply_fn).parameters)
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    kwargs.update({k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in accepted})
    _apply_liger_kernel_to_instance(model=model, **kwargs)
    logger.info("liger kernels applied: %s", ", ".join(sorted(k for k, v in kwargs.items() if v)))
    return sorted(k for k, v in kwargs.items() if v)


def _model_apply_fn(model: Any):
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(getattr(model.config, "model_type", None))
