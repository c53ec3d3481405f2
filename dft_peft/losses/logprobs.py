"""log p(target) for a chunk of logits: what every objective of the target probability starts from."""

from __future__ import annotations

import torch


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row, without materialising a second [n, V] log-softmax tensor."""
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
