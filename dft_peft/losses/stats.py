"""Token-level diagnostics gathered from the same chunked pass as the loss.

DFT's loss reads 10-20x lower than cross-entropy, and plain CE may even rise while DFT trains
well; users who see only the objective think the run is broken. So every chunk also adds its
plain CE, mean target-token probability, token accuracy and mean entropy here, on the device and
without a host sync; the numbers are read (one sync) only when a log line is written.
"""

from __future__ import annotations

import torch

STAT_NAMES = ("objective", "ce", "p_mean", "token_acc", "entropy")


class TokenStats:
    """Running sums over tokens since the last `pop()`."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, per_token_loss: torch.Tensor) -> None:
        """Add one chunk: `logits` [n, V] in fp32/fp64 (after any soft-capping), `targets` [n]."""
        if targets.numel() == 0:
            return
        lse = torch.logsumexp(logits, dim=-1)
        ce = lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        correct = logits.argmax(dim=-1).eq(targets)
        probs = torch.softmax(logits, dim=-1)
        # sum_v p_v * logit_v as a batched dot product: no second [n, V] temporary.
        expected_logit = torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
        entropy = lse - expected_logit
        chunk = torch.stack(
            [
                per_token_loss.detach().sum(),
                ce.sum(),
                torch.exp(-ce).sum(),
                correct.sum(),
                entropy.sum(),
                torch.tensor(float(targets.numel()), device=logits.device),
            ]
        ).to(torch.float64)
        self._sums = chunk if self._sums is None else self._sums + chunk

    def pop(self) -> dict[str, float]:
        """Means per token since the last call (empty when no token was seen); resets the sums."""
        if self._sums is None:
            return {}
        values = self._sums.tolist()
        self._sums = None
        count = values[-1]
        if count <= 0:
            return {}
        return {name: value / count for name, value in zip(STAT_NAMES, values[:-1])} | {
            "tokens": count
        }
