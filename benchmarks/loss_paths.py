"""The two loss paths every loss benchmark times: the naive one (full logits, then the loss,
as TRL's `loss_type="dft"` does) and dft-peft's fused one. Shared by benchmarks/loss.py (CPU)
and benchmarks/gpu/loss.py so both time exactly the same code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_loss(hidden, weight, labels, loss):
    logits = F.linear(hidden, weight).float()
    logits, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = -logp if loss == "sft" else -(logp.exp().detach() * logp)
    return (per_token * mask).sum() / mask.sum()


def fused_loss(hidden, weight, labels, loss):
    import dft_peft

    return dft_peft.fused_linear_loss(hidden, weight, labels, loss)
