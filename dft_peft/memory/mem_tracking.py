"""PyTorch's `MemTracker`, usable on a LoRA model whose base weights are frozen.

`MemTracker` installs a gradient hook on every parameter of every module it enters, and
`register_hook` raises on a tensor that does not require a gradient ("cannot register a hook on a
tensor that doesn't require gradient"): every frozen base weight of a LoRA model. This subclass
tracks all parameters and buffers as MemTracker does, and installs the gradient hooks on the
trainable ones only (frozen weights never get a gradient to track).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

CATEGORIES = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OPT: "optimizer",
    _MemRefType.OTH: "other",
}


class TrainableOnlyMemTracker(MemTracker):
    """MemTracker with gradient hooks on trainable parameters only."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        param_memory, buffer_memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if not install_grad_hooks:
            return param_memory, buffer_memory

        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        for param in module.parameters():
            if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                )
        return param_memory, buffer_memory


    def _update_peak_stats(self, peak_state: Any) -> None:
        """The global per-device peak only. MemTracker also refreshes a per-module peak for every
        module it has seen, on every op: quadratic in the number of modules (80 s for one
        Llama-8B step on 2 cores). The rehearsal reads the global peak alone."""
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(dev_snap)


def category_bytes(tracker: MemTracker, device: str = "meta") -> dict[str, int]:
    """Bytes per category at the tracker's peak on `device` (all categories, zero when absent)."""
    snapshot = tracker.get_tracker_snapshot("peak")
    by_device = next((snap for dev, snap in snapshot.items() if torch.device(dev).type == device), {})
    out = {name: 0 for name in CATEGORIES.values()}
    for key, size in by_device.items():
        if key in CATEGORIES:
            out[CATEGORIES[key]] += int(size)
    return out
