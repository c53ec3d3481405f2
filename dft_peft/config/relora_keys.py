"""Axolotl 0.19's ReLoRA keys (`relora`, `relora_prune_ratio`, `relora_prune_method`,
`relora_cpu_offload`) and its jagged learning-rate restarts (`jagged_restart_steps`,
`jagged_restart_warmup_steps`, `jagged_restart_anneal_steps`), checked as Axolotl checks them.

Axolotl's rules (src/axolotl/utils/schemas/validation.py `check_relora`): ReLoRA needs
`jagged_restart_steps`, a LoRA adapter, and neither FSDP nor DeepSpeed. At run time Axolotl's
callback supports Adam optimizers only (monkeypatch/relora.py). Where Axolotl would fail later, or
silently ignore a key, the config is refused or warned about here, in one line. The restarts
themselves run in `dft_peft/training/relora.py`, the schedule in `dft_peft/training/jagged_schedule.py`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dft_peft.config.schema import ConfigSchema as Config

# Axolotl's defaults when the keys are unset (core/trainers/mixins/scheduler.py: `or 10`, `or 1`).
DEFAULT_WARMUP_STEPS = 10
DEFAULT_ANNEAL_STEPS = 1
# torchao's low-bit AdamW keeps its moments in quantized tensor subclasses the restart cannot prune.
TORCHAO_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit")
RELORA_ONLY = ("relora_prune_ratio", "relora_prune_method", "relora_cpu_offload")
JAGGED_ONLY = ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps")


def off_means_unset(value: Any) -> Any:
    """`jagged_restart_anneal_steps: false` (Axolotl's own example) means unset: Axolotl reads
    these keys as `value or default`."""
    return None if value is False else value


def check_relora(cfg: Config) -> None:
    """Raise ValueError (one line) for ReLoRA settings that cannot run; warn where Axolotl ignores a key."""
    if cfg.relora:
        if not cfg.jagged_restart_steps:
            raise ValueError("`relora: true` needs `jagged_restart_steps` (how often LoRA is merged and restarted), as in Axolotl; set e.g. `jagged_restart_steps: 150`.")
        if cfg.fsdp_config or cfg.fsdp_version:
            raise ValueError("`relora` is not supported with FSDP (Axolotl refuses it too); remove `fsdp_config`/`fsdp_version` or `relora`.")
        if cfg.deepspeed:
            raise ValueError("`relora` is not supported with DeepSpeed (Axolotl refuses it too); remove `deepspeed` or `relora`.")
        if cfg.optimizer in TORCHAO_OPTIMIZERS:
            raise ValueError(f"`relora` resets Adam's moments at each restart, which {cfg.optimizer} keeps in torchao's quantized tensors; use adamw_torch or adamw_bnb_8bit.")
        if cfg.lora_target_parameters:
            raise ValueError("`relora` merges LoRA into Linear weights; `lora_target_parameters` (fused expert tensors) cannot be restarted, remove one of them.")
        return
    unused = [key for key in RELORA_ONLY if getattr(cfg, key) not in (None, False)]
    if not cfg.jagged_restart_steps:
        unused += [key for key in JAGGED_ONLY if getattr(cfg, key) is not None]
    if unused:
        warnings.warn(  # Axolotl ignores them too
            f"{', '.join(unused)} only apply with `relora: true` / `jagged_restart_steps` (as in Axolotl); ignored.",
            UserWarning,
            stacklevel=2,
        )
