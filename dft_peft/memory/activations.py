"""What the config asks of activation memory, applied to a model after its adapter is attached.

Gradient checkpointing itself is switched on by `dft_peft.model.adapter` (peft's k-bit preparation
needs to know); what it keeps between the passes is decided here: each checkpointed layer input
offloaded to host memory (`gradient_checkpointing: offload`, Axolotl's `activation_offloading`),
each decoder layer's MLP run over sequence shards (`tiled_mlp`), and, whenever checkpointing is on,
every RMSNorm made memory-lean (lean_norm.py: the same forward, no fp32 copy kept for backward;
its gradients differ from autograd's by rounding only). `train`, the meta-device rehearsal
and the benchmarks call this one function, so all three run the same model.
"""

from __future__ import annotations

from typing import Any

from dft_peft.memory.lean_norm import apply_lean_norm
from dft_peft.memory.offload import offload_checkpointed_inputs
from dft_peft.memory.tiled_mlp import apply_tiled_mlp


def apply_activation_memory(model: Any, cfg: Any) -> list[str]:
    """Apply the config's activation-memory options to `model`; returns what was applied, for the log."""
    applied: list[str] = []
    if cfg.gradient_checkpointing:
        norms = apply_lean_norm(model)
        if norms:
            applied.append(f"memory-lean RMSNorm ({norms} norms)")
    if cfg.gradient_checkpointing == "offload":
        layers = offload_checkpointed_inputs(model)
        applied.append(f"offloaded checkpointing ({layers} layers)")
    if getattr(cfg, "tiled_mlp", False):
        shards = getattr(cfg, "tiled_mlp_num_shards", None)
        tiled = apply_tiled_mlp(model, num_shards=shards)
        applied.append(f"tiled MLP ({tiled} layers, {shards or 'auto'} shards)")
    return applied
