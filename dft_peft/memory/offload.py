"""`gradient_checkpointing: offload`: checkpointed layer inputs wait in CPU memory.

Plain gradient checkpointing keeps one tensor per decoder layer on the GPU, the layer's input
([tokens, hidden]), and recomputes the layer from it during the backward pass. For Llama-3-8B at
32k tokens that is 32 x 32k x 4096 x 2 bytes = 8.6 GB in bf16 (twice that when the residual stream
is fp32), which is most of what stops long sequences fitting a 16 GB card. Axolotl's `offload`
mode (from Unsloth) copies each layer's input to CPU memory (pinned, asynchronously) as soon as
the layer has run, and copies it back when the backward pass reaches that layer, so the GPU only
ever holds the input of the layer being recomputed: activation memory no longer grows with depth.

The recomputation is exact: the CPU and CUDA random states (dropout) and the autocast state of the
forward pass are restored for it, and the layer's parameter gradients accumulate as in PyTorch's
reentrant checkpointing (the layer is re-run and back-propagated inside this function's backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dft_peft.memory.host_ledger import meta_from_host, meta_host_copy
from dft_peft.memory.recompute_state import autocast_state, replay_autocast


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `run(hidden, *rest)` without keeping activations; keep `hidden` in host memory."""

    @staticmethod
    def forward(ctx, run: Callable[..., Any], anchor: torch.Tensor, hidden: torch.Tensor, *rest: Any):
        device = hidden.device
        ctx.run, ctx.rest, ctx.device = run, rest, device
        ctx.autocast = autocast_state(device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.hidden_on_host = to_host(hidden)
        with torch.no_grad():
            return run(hidden, *rest)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        hidden = from_host(ctx.hidden_on_host, ctx.device).requires_grad_(True)
        ctx.hidden_on_host = None  # release the host copy as soon as it is back
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), replay_autocast(ctx.device.type, ctx.autocast):
                out = ctx.run(hidden, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, hidden.grad, *([None] * len(ctx.rest)))


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`: pinned and asynchronous from CUDA (the copy overlaps the next
    layer's compute; the caching allocators order the reuse of both buffers on the stream)."""
    if tensor.is_meta:  # the memory rehearsal: booked as host memory, invisible to the GPU tracker
        return meta_host_copy(tensor)
    pinned = tensor.is_cuda
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
    host.copy_(tensor.detach(), non_blocking=pinned)
    return host


def from_host(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device copy of a host copy made by `to_host` (asynchronous from pinned memory)."""
    if device.type == "meta":
        return meta_from_host(host)
    return host.to(device, non_blocking=True)


def offloaded_checkpoint(run: Callable[..., Any], hidden: torch.Tensor, *rest: Any, **_ignored: Any) -> Any:
    """Drop-in for `torch.utils.checkpoint.checkpoint` as transformers calls it per layer:
    `(partial(layer.forward, **kwargs), hidden_states, ...)`.

    Only the first positional tensor (the residual stream) is offloaded and gets a gradient; the
    keyword inputs (position embeddings, masks) stay where they are. A fresh leaf that requires a
    gradient is passed along, so the layer's LoRA weights get their gradients even when the
    hidden states themselves do not require one.
    """
    if not torch.is_grad_enabled():
        return run(hidden, *rest)
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, anchor, hidden, *rest)


def offload_checkpointed_inputs(model: torch.nn.Module) -> int:
    """Switch every layer that transformers checkpoints to the offloading checkpoint. Call it
    after gradient checkpointing is enabled (which sets `_gradient_checkpointing_func` on those
    layers). Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = offloaded_checkpoint
            switched += 1
    if not switched:
        raise ValueError(f"{type(model).__name__} has no checkpointed layers: enable gradient checkpointing first")
    return switched
