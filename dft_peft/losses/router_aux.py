"""The mixture-of-experts router's load-balancing loss, added to the fused objective as the model would.

A Mixtral / Qwen-MoE / OLMoE model with `output_router_logits: true` (Axolotl: `model_config:
{output_router_logits: true}`) trains on `loss + router_aux_loss_coef * load_balancing_loss`:
without the second term the router is free to send every token to the same few experts. The
patched forward (`patch.py`) computes the first term from hidden states and never calls the model's
own forward, so it adds the second here, with the model's own `load_balancing_loss_func` from its
modeling module and the model's own coefficient: the sum is what the unpatched model returns.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def wants_router_loss(causal_lm: nn.Module) -> bool:
    """Whether the model's config asks for the router's auxiliary loss."""
    return bool(getattr(getattr(causal_lm, "config", None), "output_router_logits", False))


def router_aux_loss(causal_lm: nn.Module, decoder_outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`router_aux_loss_coef * load_balancing_loss`, or None when the model does not use one.

    A model that asks for it but whose modeling code this cannot reproduce is an error, not a
    silently smaller objective."""
    if not wants_router_loss(causal_lm):
        return None
    router_logits = getattr(decoder_outputs, "router_logits", None)
    balance = getattr(sys.modules.get(type(causal_lm).__module__), "load_balancing_loss_func", None)
    needed = ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")
    if router_logits is None or balance is None or not all(hasattr(causal_lm, name) for name in needed):
        raise ValueError(
            f"{type(causal_lm).__name__} has output_router_logits set, but dft-peft cannot add its router's "
            "auxiliary loss (no `load_balancing_loss_func` or router logits); unset output_router_logits."
        )
    aux = balance(router_logits, causal_lm.num_experts, causal_lm.num_experts_per_tok, attention_mask)
    return causal_lm.router_aux_loss_coef * aux
