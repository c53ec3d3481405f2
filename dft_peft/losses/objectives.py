"""Per-token training objectives.

Each objective receives fp32 (or fp64) logits of valid tokens only, `[n, V]`, and their targets
`[n]`, and returns per-token losses `[n]`. Chunking, masking, normalisation and the backward pass
are done by `fused.py`, identically for every objective. Objectives that depend only on
log p(target) are written as functions of that vector (`register_loss_of_logp`), which gives the
fused path a fast gradient; the general `(logits, targets)` form is derived from them.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dft_peft.losses.registry import register_loss, register_loss_of_logp


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row, without materialising a second [n, V] log-softmax tensor."""
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


@register_loss_of_logp("sft")
def sft(logp: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy, -log p(y_t)."""
    return -logp


class DFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dft_alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Mix of the DFT weight: alpha * sg(p) + (1 - alpha). 1 is the paper's DFT, 0 is SFT.",
    )


@register_loss_of_logp("dft", params=DFTParams)
def dft(logp: torch.Tensor, dft_alpha: float = 1.0) -> torch.Tensor:
    """Dynamic Fine-Tuning (arXiv 2508.05629, Eq. 9): -sg(p) * log p(y_t).

    The detached probability cancels the 1/p that SFT's gradient hides, so tokens the model finds
    very unlikely stop dominating the update. With alpha = 1 this is exactly TRL's
    `-exp(logp).detach() * logp`.
    """
    weight = logp.detach().exp()
    if dft_alpha != 1.0:
        weight = dft_alpha * weight + (1.0 - dft_alpha)
    return -weight * logp


class ASFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    asft_lambda: float = Field(0.1, ge=0.0, description="Weight of the per-token KL(p_base || p_theta) anchor.")


@register_loss("asft", params=ASFTParams, needs=("ref_logits",))
def asft(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor, asft_lambda: float = 0.1
) -> torch.Tensor:
    """Anchored DFT (arXiv 2509.23753): DFT + lambda * KL(p_base || p_theta) over the vocabulary.

    `ref_logits` are the frozen base model's logits for the same rows (under LoRA: the same model
    with the adapter disabled). The anchor keeps DFT from drifting where its down-weighting of
    unlikely tokens would otherwise let the distribution collapse.
    """
    loss = dft(target_logprobs(logits, targets))
    if asft_lambda == 0.0:
        return loss
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return loss + asft_lambda * kl


@register_loss_of_logp("prob")
def prob(logp: torch.Tensor) -> torch.Tensor:
    """1 - p(y_t) ("Beyond log likelihood", arXiv 2510.00526): its gradient equals DFT's."""
    return -torch.expm1(logp)


class PowerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    power_q: float = Field(0.5, gt=0.0, le=1.0, description="q -> 0 is SFT (-log p); q = 1 is `prob` (1 - p).")


@register_loss_of_logp("power", params=PowerParams)
def power(logp: torch.Tensor, power_q: float = 0.5) -> torch.Tensor:
    """-(p^q - 1) / q (arXiv 2510.00526): interpolates between SFT (q -> 0) and `prob` (q = 1)."""
    return -torch.expm1(power_q * logp) / power_q
