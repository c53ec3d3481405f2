"""FSDP1 as Axolotl configs still write it, read as the FSDP2 settings that mean the same.

Older Axolotl examples shard with `fsdp: [full_shard, auto_wrap]` and an `fsdp_config:` of FSDP1
keys (`fsdp_sharding_strategy`, `fsdp_limit_all_gathers`, ...). dft-peft trains with FSDP2
(`dft_peft.training.distributed`); the sharding itself is the same mathematics, so each FSDP1
setting maps onto its FSDP2 counterpart, and FSDP1's communication knobs that FSDP2 has no use
for are dropped (speed only). Strategies that shard differently (hybrid, none) are refused.
"""

from __future__ import annotations

from typing import Any

from dft_peft.errors import UserError

# `fsdp:` list items (transformers' FSDPOption names) -> (FSDP2 fsdp_config key, value).
LIST_ITEMS = {
    "full_shard": ("reshard_after_forward", True),
    "shard_grad_op": ("reshard_after_forward", False),
    "offload": ("offload_params", True),
    "auto_wrap": ("auto_wrap_policy", "TRANSFORMER_BASED_WRAP"),
}
# FSDP1 `sharding_strategy` -> FSDP2 `reshard_after_forward` (what FULL_SHARD / SHARD_GRAD_OP differ in).
STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "1": True, "2": False}
REFUSED_STRATEGIES = {
    "NO_SHARD": "NO_SHARD shards nothing (plain data parallel): drop fsdp and launch with torchrun for DDP",
    "HYBRID_SHARD": "hybrid sharding across nodes is not supported; use FULL_SHARD",
    "_HYBRID_SHARD_ZERO2": "hybrid sharding across nodes is not supported; use SHARD_GRAD_OP",
    "hybrid_shard": "hybrid sharding across nodes is not supported; use full_shard",
    "hybrid_shard_zero2": "hybrid sharding across nodes is not supported; use shard_grad_op",
    "no_shard": "no_shard shards nothing (plain data parallel): drop fsdp and launch with torchrun for DDP",
}
# FSDP1 communication settings FSDP2 has no counterpart for: they change speed, not results.
SPEED_ONLY = ("limit_all_gathers", "backward_prefetch", "forward_prefetch", "use_orig_params")


def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"fsdp: expected a list such as [full_shard, auto_wrap], got {value!r}.")


def translate_legacy_fsdp(raw: dict[str, Any]) -> str | None:
    """Rewrite `raw`'s FSDP1 settings in place as FSDP2 ones; the note to show, or None."""
    present = "fsdp" in raw
    items = raw.pop("fsdp", None)
    block = raw.get("fsdp_config")
    version = raw.get("fsdp_version", (block or {}).get("fsdp_version") if isinstance(block, dict) else None)
    if not items and not isinstance(block, dict):
        if present:
            raw["fsdp"] = items  # empty: left for the key table (an unset Axolotl key)
        return None
    mapped: list[str] = []
    settings: dict[str, Any] = {}
    for item in _items(items) if items else []:
        if item in REFUSED_STRATEGIES:
            raise UserError(f"fsdp: `{item}`: {REFUSED_STRATEGIES[item]}.")
        if item not in LIST_ITEMS:
            raise UserError(f"fsdp: unknown item `{item}`; use full_shard or shard_grad_op, with auto_wrap and offload.")
        key, value = LIST_ITEMS[item]
        settings[key] = value
        mapped.append(f"{item} -> {key}: {str(value).lower() if isinstance(value, bool) else value}")
    dropped: list[str] = []
    for key, value in dict(block or {}).items():
        name = key[5:] if key.startswith("fsdp_") and key != "fsdp_version" else key
        if name in SPEED_ONLY:
            dropped.append(name)
            continue
        if name == "sharding_strategy":
            strategy = str(value)
            if strategy in REFUSED_STRATEGIES:
                raise UserError(f"fsdp_config: sharding_strategy `{strategy}`: {REFUSED_STRATEGIES[strategy]}.")
            if strategy not in STRATEGIES:
                raise UserError(f"fsdp_config: unknown sharding_strategy `{strategy}`; use FULL_SHARD or SHARD_GRAD_OP.")
            settings["reshard_after_forward"] = STRATEGIES[strategy]
            mapped.append(f"sharding_strategy {strategy} -> reshard_after_forward: {str(STRATEGIES[strategy]).lower()}")
            continue
        if name in ("fsdp_version", "version"):
            continue
        settings.setdefault(name, value)
    legacy = bool(items) or bool(dropped) or any(m.startswith("sharding_strategy") for m in mapped) or str(version) == "1"
    if not legacy:
        if present:
            raw["fsdp"] = items  # empty: left for the key table (an unset Axolotl key)
        return None
    raw["fsdp_config"] = settings
    raw["fsdp_version"] = 2
    parts = mapped + ([f"dropped FSDP1-only {', '.join(dropped)} (speed only)"] if dropped else [])
    return "FSDP1 settings run as FSDP2" + (f" ({'; '.join(parts)})" if parts else "")
