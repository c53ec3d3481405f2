"""Host memory of offloaded tensors during a meta-device rehearsal.

On a CUDA card `gradient_checkpointing: offload` copies each checkpointed layer input into pinned
host memory. In the rehearsal every tensor is a meta tensor, so the host copy is one too; it must
not count as GPU memory, and the host memory it stands for must be reported (50k tokens of
Llama-8B layer inputs are ~13 GB of pinned RAM). A host copy made here is created outside any
active dispatch mode (MemTracker does not see it) and its bytes are booked in the active ledger
until the copy is freed. Coming back, `meta_from_host` allocates a fresh device (meta) tensor
under the tracker, as `.to("cuda")` does.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import torch


@dataclass
class HostLedger:
    """Live and peak bytes of host copies (all pinned: that is how a CUDA run allocates them)."""

    live: int = 0
    peak: int = 0
    copies: int = 0

    def book(self, nbytes: int) -> None:
        self.live += nbytes
        self.copies += 1
        self.peak = max(self.peak, self.live)

    def release(self, nbytes: int) -> None:
        self.live -= nbytes


_ACTIVE: list[HostLedger] = []


@contextmanager
def host_ledger() -> Iterator[HostLedger]:
    """Book the host copies made inside the block (nested blocks book into the innermost)."""
    ledger = HostLedger()
    _ACTIVE.append(ledger)
    try:
        yield ledger
    finally:
        _ACTIVE.remove(ledger)


def meta_host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A stand-in for the pinned host copy of a meta tensor, booked in the active ledger."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    nbytes = tensor.numel() * tensor.element_size()
    if _ACTIVE:
        ledger = _ACTIVE[-1]
        ledger.book(nbytes)
        weakref.finalize(host, ledger.release, nbytes)
    return host


def meta_from_host(host: torch.Tensor) -> torch.Tensor:
    """The device copy of a host stand-in: a fresh allocation, seen by the tracker."""
    return torch.empty(host.shape, dtype=host.dtype, device="meta")
