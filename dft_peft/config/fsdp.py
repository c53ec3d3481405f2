"""Axolotl's `fsdp_config:` block: its key names (with or without the `fsdp_` prefix) mapped onto
transformers' FSDP settings. Read while the config is validated; `dft_peft.training.distributed`
turns the result into TrainingArguments."""

from __future__ import annotations

from typing import Any

from dft_peft.errors import did_you_mean

# Axolotl's `fsdp_config` keys (axolotl/utils/schemas/fsdp.py, 0.19) -> transformers' names.
# Axolotl and transformers both accept the older `fsdp_`-prefixed spelling of each.
FSDP_KEYS = {
    "fsdp_version": "version",
    "version": "version",
    "activation_checkpointing": "activation_checkpointing",
    "offload_params": "cpu_offload",
    "cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "state_dict_type": "state_dict_type",
    "auto_wrap_policy": "auto_wrap_policy",
    "transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
    "min_num_params": "min_num_params",
    "reshard_after_forward": "reshard_after_forward",
    "sync_module_states": "sync_module_states",
    "use_orig_params": "use_orig_params",
}


def normalise_fsdp_config(block: dict[str, Any] | None) -> dict[str, Any] | None:
    """Axolotl's `fsdp_config:` with the `fsdp_` prefixes dropped; an unknown key is an error."""
    if block is None:
        return None
    out = {}
    for key, value in block.items():
        name = key[5:] if key.startswith("fsdp_") and key != "fsdp_version" else key
        if name not in FSDP_KEYS:
            raise ValueError(f"fsdp_config: unknown key `{key}`.{did_you_mean(name, FSDP_KEYS)}")
        out[name] = value
    version = out.get("fsdp_version", out.get("version"))
    if version is not None and int(version) != 2:
        raise ValueError("fsdp_config: only FSDP2 is supported; set fsdp_version: 2")
    return out
