"""Per-token training objectives.

Each function receives fp32 (or fp64) logits of valid tokens only, `[n, V]`, and their targets
`[n]`, and returns per-token losses `[n]`. Chunking, masking, normalisation and the backward pass
are done by `fused.py`, identically for every objective.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dft_peft.losses.registry import register_loss


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row, without materialising a second [n, V] log-softmax tensor."""
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


@register_loss("sft")
def sft(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy, -log p(y_t)."""
    return -target_logprobs(logits, targets)


class DFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dft_alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Mix of the DFT weight: alpha * sg(p) + (1 - alpha). 1 is the paper's DFT, 0 is SFT.",
    )


@register_loss("dft", params=DFTParams)
def dft(logits: torch.Tensor, targets: torch.Tensor, dft_alpha: float = 1.0) -> torch.Tensor:
    """Dynamic Fine-Tuning (arXiv 2508.05629, Eq. 9): -sg(p) * log p(y_t).

    The detached probability cancels the 1/p that SFT's gradient hides, so tokens the model finds
    very unlikely stop dominating the update. With alpha = 1 this is exactly TRL's
    `-exp(logp).detach() * logp`.
    """
    logp = target_logprobs(logits, targets)
    weight = logp.detach().exp()
    if dft_alpha != 1.0:
        weight = dft_alpha * weight + (1.0 - dft_alpha)
    return -weight * logp
