"""Token-level diagnostics gathered from the same chunked pass as the loss.

DFT's loss reads 10-20x lower than cross-entropy, and plain CE may even rise while DFT trains
well; users who see only the objective think the run is broken. So every chunk also adds its
plain CE, mean target-token probability, token accuracy and mean entropy here, on the device and
without a host sync; the numbers are read (one sync) only when a log line is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STAT_NAMES = ("objective", "ce", "p_mean", "token_acc", "entropy")


class TokenStats:
    """Running sums over tokens since the last `pop()`."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, per_token_loss: torch.Tensor) -> None:
        """Add one chunk from its logits [n, V] (fp32/fp64, after any soft-capping) and targets [n]."""
        if targets.numel() == 0:
            return
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(1, targets.unsqueeze(1)).squeeze(1)
        entropy = torch.special.entr(logp_all.exp_()).sum(dim=-1)
        self.add_values(per_token_loss, logp, logits.argmax(dim=-1).eq(targets), entropy)

    @torch.no_grad()
    def add_values(
        self,
        per_token_loss: torch.Tensor,
        target_logp: torch.Tensor,
        correct: torch.Tensor,
        entropy: torch.Tensor,
    ) -> None:
        """Add one chunk from per-token values the caller already computed (the fast path)."""
        chunk = torch.stack(
            [
                per_token_loss.detach().sum(),
                -target_logp.sum(),
                target_logp.exp().sum(),
                correct.sum(),
                entropy.sum(),
                torch.tensor(float(target_logp.numel()), device=target_logp.device),
            ]
        ).to(torch.float64)
        self._sums = chunk if self._sums is None else self._sums + chunk

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Means per token since the last call (empty when no token was seen); resets the sums.

        `reduce` adds the sums and the token count over processes before the division (e.g.
        `dft_peft.training.distributed.all_reduce_sum`), so under DDP the means are the global batch's,
        token-weighted, not an average of per-rank means. It is a collective: every rank calls
        it, also one that saw no token since the last log.
        """
        sums = self._sums
        self._sums = None
        if reduce is not None:
            sums = reduce(torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64) if sums is None else sums)
        if sums is None:
            return {}
        values = sums.tolist()
        count = values[-1]
        if count <= 0:
            return {}
        return {name: value / count for name, value in zip(STAT_NAMES, values[:-1])} | {
            "tokens": count
        }
