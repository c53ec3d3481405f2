"""What a recomputation must replay to be exact: the autocast state of the forward pass.

Offloaded checkpointing and the tiled MLP both run part of the forward pass again inside their
backward, and both must see the autocast setting the first pass saw. The meta device (the memory
rehearsal) has no autocast at all: asking for its state raises, so it is recorded as off there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

AutocastState = tuple[bool, torch.dtype]


def autocast_state(device_type: str) -> AutocastState:
    """(enabled, dtype) of autocast on `device_type` right now."""
    if device_type == "meta":  # the memory rehearsal: autocast has no meta device (and is never on)
        return False, torch.float32
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def replay_autocast(device_type: str, state: AutocastState) -> Any:
    """A context manager that restores `state` (a no-op on meta)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
