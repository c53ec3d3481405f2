"""Which top-level keys a config may hold: ours, an objective's parameters, or Axolotl's.

No key is ever dropped silently: a typo is an error with the closest key, an Axolotl key we do
not implement is an error (a warning with `strict: false`), and an Axolotl key left empty or off
is accepted quietly because ignoring it is exact.
"""

from __future__ import annotations

import warnings
from typing import Any

from dft_peft.config.axolotl_keys import (
    AXOLOTL_HARMLESS_KEYS,
    AXOLOTL_UNSUPPORTED_KEYS,
    AXOLOTL_UNSUPPORTED_PREFIXES,
    DEFAULT_TRUE_KEYS,
    UNSUPPORTED_HINTS,
)
from dft_peft.config.normalize import INPUT_ONLY_KEYS
from dft_peft.errors import UserError, closest, did_you_mean


def loss_param_owners() -> dict[str, str]:
    """Every objective parameter key -> the objective that declares it."""
    from dft_peft.losses.registry import loss_param_names

    return {key: name for name, keys in loss_param_names().items() for key in keys}


def supported_keys() -> set[str]:
    from dft_peft.config.schema import Config

    return set(Config.model_fields) | set(INPUT_ONLY_KEYS)


def is_axolotl_key(key: str) -> bool:
    """Whether `key` is a real Axolotl option that dft-peft does not implement."""
    return (
        key in AXOLOTL_UNSUPPORTED_KEYS
        or key in AXOLOTL_HARMLESS_KEYS
        or key.startswith(AXOLOTL_UNSUPPORTED_PREFIXES)
    )


def is_off(key: str, value: Any) -> bool:
    """Whether an unsupported key's value means the feature is unused (so ignoring it is exact).

    Axolotl's example files list many keys left empty (`deepspeed:`) or off (`group_by_length:
    false`); those must not stop a config from loading.
    """
    if key in DEFAULT_TRUE_KEYS:
        return value is None or value is True
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, dict)) and not value:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def unknown_key_message(key: str, candidates: set[str]) -> str:
    hint = did_you_mean(key, candidates)
    if not hint:
        near = closest(key, AXOLOTL_UNSUPPORTED_KEYS)
        if near:
            hint = f" Did you mean `{near}` (an Axolotl option dft-peft does not support)?"
        else:
            hint = " It is not a dft-peft or Axolotl option; remove it."
    return f"unknown key `{key}`.{hint}"


def check_override_key(key: str) -> None:
    supported = supported_keys() | set(loss_param_owners())
    if key in supported or is_axolotl_key(key):
        return
    raise UserError(f"command-line override `--{key}`: {unknown_key_message(key, supported)}")


def sort_keys(
    raw: dict[Any, Any], label: str, strict: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Split top-level keys into schema fields, objective parameters and ignored Axolotl keys.

    Raises for typos (always) and for Axolotl keys we do not implement (unless `strict: false`).
    """
    supported = supported_keys()
    owners = loss_param_owners()
    fields: dict[str, Any] = {}
    loss_params: dict[str, Any] = {}
    ignored: dict[str, str] = {}
    unsupported: list[str] = []
    typos: list[str] = []
    for key, value in raw.items():
        if not isinstance(key, str):
            raise UserError(
                f"{label}: top-level key {key!r} is not a name; keys are text such as `lora_r`."
            )
        if key in supported:
            fields[key] = value
        elif key in owners:
            if value is not None:  # an empty `dft_alpha:` means "use the default"
                loss_params[key] = value
        elif key in AXOLOTL_HARMLESS_KEYS:
            ignored[key] = "no effect in dft-peft"
        elif is_axolotl_key(key):
            if is_off(key, value):
                ignored[key] = "unset"
            else:
                unsupported.append(key)
        else:
            typos.append(key)
    if typos:
        candidates = supported | set(owners)
        first = unknown_key_message(typos[0], candidates)
        more = f" (also unknown: {', '.join(f'`{k}`' for k in typos[1:])})" if typos[1:] else ""
        raise UserError(f"{label}: {first}{more}")
    if unsupported and strict:
        if len(unsupported) == 1:
            key = unsupported[0]
            hint = f" ({UNSUPPORTED_HINTS[key]})" if key in UNSUPPORTED_HINTS else ""
            raise UserError(
                f"{label}: `{key}` is an Axolotl option dft-peft does not support{hint}; remove it "
                f"(or set `strict: false` to ignore it with a warning)."
            )
        names = ", ".join(f"`{k}`" for k in unsupported)
        raise UserError(
            f"{label}: {names} are Axolotl options dft-peft does not support; remove them "
            f"(or set `strict: false` to ignore them with a warning)."
        )
    for key in unsupported:
        warnings.warn(
            f"{label}: ignoring `{key}`, an Axolotl option dft-peft does not support "
            "(strict: false).",
            UserWarning,
            stacklevel=4,
        )
        ignored[key] = "not supported, ignored (strict: false)"
    return fields, loss_params, ignored


def drop_axolotl_plugins(
    fields: dict[str, Any], label: str, strict: bool, ignored: dict[str, str]
) -> dict[str, Any]:
    """Axolotl's own plugins (`axolotl.integrations.*`) cannot run here: error, or warn and drop."""
    plugins = fields.get("plugins")
    if not isinstance(plugins, list):
        return fields
    axolotl = [p for p in plugins if isinstance(p, str) and p.startswith("axolotl.")]
    if not axolotl:
        return fields
    if strict:
        raise UserError(
            f"{label}: `plugins: {axolotl[0]}` is an Axolotl plugin dft-peft does not support; "
            "remove it (or set `strict: false` to ignore it with a warning)."
        )
    for name in axolotl:
        warnings.warn(
            f"{label}: ignoring Axolotl plugin `{name}` (strict: false).", UserWarning, stacklevel=4
        )
        ignored[f"plugins: {name}"] = "not supported, ignored (strict: false)"
    kept = [p for p in plugins if p not in axolotl]
    return {**fields, "plugins": kept or None}

